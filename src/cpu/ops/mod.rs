//! CPU engine operators: plain f32 functions over flat NCHW buffers, forward and backward.
//! Each backward overwrites its outputs (it never accumulates into them).

pub mod conv;
pub mod linear;
pub mod loss;
pub mod matmul;
pub mod mil;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod tensor;
pub mod upsample;

/// Shape of a batched NCHW tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Dims {
    pub fn new(n: usize, c: usize, h: usize, w: usize) -> Self {
        Dims { n, c, h, w }
    }
    pub fn len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn hw(&self) -> usize {
        self.h * self.w
    }
}
