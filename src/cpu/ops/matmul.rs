//! The matrix product under the CPU convolutions and linear layers (and the convolution
//! bench's im2col baseline): a strided f32 GEMM through the `gemm` crate.

pub use gemm::Parallelism;

/// A matrix operand of [`matmul`]: element (i, j) at `ptr + i·rs + j·cs` (strides in floats).
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl Operand {
    /// A row-major matrix whose rows are `ld` floats apart.
    pub fn rows(ptr: *const f32, ld: usize) -> Operand {
        Operand {
            ptr,
            rs: ld as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `ld` floats apart.
    pub fn transposed(ptr: *const f32, ld: usize) -> Operand {
        Operand {
            ptr,
            rs: 1,
            cs: ld as isize,
        }
    }
}

/// dst [m, n] (row-major, rows `ldd` floats apart) = lhs [m, k] · rhs [k, n], added to what dst
/// holds when `accumulate`, else overwriting it; `gemm::gemm` with `par` threads.
///
/// # Safety
/// Every element of dst, lhs and rhs that (m, n, k) and the strides reach must be in bounds,
/// and dst must not overlap lhs or rhs.
#[inline]
pub unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    (dst, ldd): (*mut f32, usize),
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ldd as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        par,
    );
}
