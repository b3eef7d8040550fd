//! Convolutions (3×3 and 1×1, NCHW f32) of the CPU engine, forward and backward: the public entry points.
//!
//! A convolution is an implicit GEMM: GEMM-M = output channels, GEMM-N = the pixels of one image,
//! GEMM-K = input channels × taps (9 for 3×3, 1 for 1×1). Rayon tasks each own a tile of a few
//! hundred output pixels of one image (and, when tiles are scarce, a block of output channels)
//! and take the input channels in chunks of at most 64 (3×3) into a per-thread scratch; no
//! whole-image im2col is ever built. Two backends share this tiling:
//! - AVX-512F (chosen at run time): the tile holds each input channel once, as a flat row with
//!   a halo of one image row and one pixel; an 8×48 micro-kernel reads the 9 taps as shifted
//!   loads (lanes on the image's first/last column masked) and broadcasts packed weights.
//!   Images too small to fill a tile (the deep levels) go several to a tile, stacked with a
//!   zero row between them, instead of one mostly padded tile each.
//! - Portable (any CPU): an unfolded im2col tile (K rows × tile pixels) times the weights
//!   through the `gemm` crate, single-threaded inside the task.
//!
//! Backward: dx is the forward convolution of dy with the transposed, flipped weights (the same
//! tiled path). dwᵀ[k, co] = Σ_pixels unfold(x)[k, p] · dy[co, p]: a task owns a chunk of input
//! channels and a fixed range of tiles. On AVX-512 the tile's channels are laid out with a zero
//! column each side (so every tap is a shifted pointer), dy is transposed to [pixel][64
//! channels] (kept in L1), and a 6×64 micro-kernel broadcasts from six shifted channel rows.
//! Tile sums go to f64 partials reduced in a fixed order; db is summed in the same sweep. No
//! sum depends on scheduling or thread count, so every result is bit-identical from run to run.
//!
//! Files: `pack` (input planes, packed weight panels, unfolded and padded-row tiles), `tiling`
//! (pixel tiles, channel blocks, scratch), `forward` (the forward drivers and tile products),
//! `avx512` (the micro-kernels), `wgrad` (the weight-gradient driver).

#[cfg(target_arch = "x86_64")]
mod avx512;
mod forward;
mod pack;
#[cfg(test)]
mod tests;
mod tiling;
mod wgrad;

use super::Dims;
use forward::conv_forward;
use pack::{Packed, Planes};
use wgrad::conv_weight_grad;

/// Forward micro-kernel tile: MR output channels × NR pixels (three 16-lane vectors).
const MR: usize = 8;
const NR: usize = 48;
/// Weight-gradient micro-kernel tile: DW_MR rows of the unfolded input × DW_NR output channels.
const DW_MR: usize = 6;
const DW_NR: usize = 64;

/// Which inner kernels run the tile products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// Hand-written AVX-512F micro-kernels.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// The `gemm` crate on the same tiles (any CPU).
    Portable,
}

impl Backend {
    fn detect() -> Backend {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Backend::Avx512;
        }
        Backend::Portable
    }

    /// Rows per panel of packed weights.
    fn panel_rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => MR,
            Backend::Portable => 1,
        }
    }
}

/// Cache blocking of the drivers. It fixes the order of floating-point sums, so it is a
/// constant: results never depend on the machine or on the thread count. Tests shrink it to
/// reach every edge case (several K chunks, tiles and channel blocks) on small shapes.
#[derive(Clone, Copy, Debug)]
struct Blocking {
    /// Forward: most K rows (input channels × taps) per pass over a tile.
    fwd_k: usize,
    /// Forward: target size in floats of one unfolded chunk (K rows × tile pixels).
    fwd_col: usize,
    /// Forward: most pixels per tile.
    fwd_tile: usize,
    /// Weight gradient: most K rows per task.
    dw_k: usize,
    /// Weight gradient: most pixels per tile.
    dw_tile: usize,
    /// Weight gradient: pixels summed in f32 before the sums go into f64.
    dw_flush: usize,
    /// Channel blocks (forward) or pixel ranges (weight gradient) are split until there are at
    /// least this many tasks.
    min_tasks: usize,
}

const BLOCKING: Blocking = Blocking {
    fwd_k: 576,
    fwd_col: 1 << 18,
    fwd_tile: 4096,
    dw_k: 576,
    dw_tile: 144,
    dw_flush: 16384,
    min_tasks: 8,
};

/// Shared argument checks of the convolutions.
fn check_conv(parts: &[(&[f32], usize)], xd: Dims, taps: usize, w: &[f32], cout: usize) {
    let cin: usize = parts.iter().map(|p| p.1).sum();
    assert!(
        cin > 0 && cout > 0,
        "a convolution needs input and output channels"
    );
    assert_eq!(
        cin, xd.c,
        "input parts hold {cin} channels, dims say {}",
        xd.c
    );
    for &(data, c) in parts {
        assert_eq!(
            data.len(),
            xd.n * c * xd.hw(),
            "input part of {c} channels has the wrong length"
        );
    }
    assert_eq!(w.len(), cout * cin * taps, "weight length");
}

/// The kernels a convolution runs with: the backend and the cache blocking.
#[derive(Clone, Copy, Debug)]
struct Plan {
    be: Backend,
    bl: Blocking,
}

impl Plan {
    /// What the public entry points run: this machine's backend, the production blocking.
    fn auto() -> Plan {
        Plan {
            be: Backend::detect(),
            bl: BLOCKING,
        }
    }

    /// y = conv(concat(parts); w) + b (ReLU'd if `relu`) with `taps` 9 (3×3) or 1 (1×1).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        self,
        parts: &[(&[f32], usize)],
        xd: Dims,
        taps: usize,
        w: &[f32],
        b: &[f32],
        cout: usize,
        relu: bool,
        y: &mut [f32],
    ) {
        let Plan { be, bl } = self;
        check_conv(parts, xd, taps, w, cout);
        assert_eq!(b.len(), cout, "bias length");
        assert_eq!(y.len(), xd.n * cout * xd.hw(), "output length");
        let k = xd.c * taps;
        let wp = Packed::new(cout, k, be.panel_rows(), |co, kk| w[co * k + kk]);
        let x = Planes { parts, hw: xd.hw() };
        conv_forward(be, &bl, x, xd.n, xd.w, taps, &wp, Some(b), relu, y);
    }

    /// The gradients of [`Plan::forward`] (bias and ReLU aside): dw, db and, for each part
    /// whose slot is Some, its dx.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        self,
        parts: &[(&[f32], usize)],
        xd: Dims,
        taps: usize,
        w: &[f32],
        dy: &[f32],
        cout: usize,
        dx: &mut [Option<&mut [f32]>],
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let Plan { be, bl } = self;
        check_conv(parts, xd, taps, w, cout);
        let (cin, hw) = (xd.c, xd.hw());
        assert_eq!(dy.len(), xd.n * cout * hw, "dy length");
        assert_eq!(dw.len(), w.len(), "dw length");
        assert_eq!(db.len(), cout, "db length");
        assert_eq!(dx.len(), parts.len(), "one dx slot per input part");
        let x = Planes { parts, hw };
        conv_weight_grad(be, &bl, x, xd.n, xd.w, taps, dy, cout, dw, db);
        let dy_planes = [(dy, cout)];
        let dyp = Planes {
            parts: &dy_planes,
            hw,
        };
        let mut c_lo = 0;
        for (&(_, c), dxp) in parts.iter().zip(dx.iter_mut()) {
            if let Some(dxp) = dxp {
                assert_eq!(dxp.len(), xd.n * c * hw, "dx length");
                // dx = conv(dy; W') with W'[ci, co·taps + t] = w[co, ci, taps − 1 − t].
                let wt = Packed::new(c, cout * taps, be.panel_rows(), |r, kk| {
                    let (co, t) = (kk / taps, taps - 1 - kk % taps);
                    w[(co * cin + c_lo + r) * taps + t]
                });
                conv_forward(be, &bl, dyp, xd.n, xd.w, taps, &wt, None, false, dxp);
            }
            c_lo += c;
        }
    }
}

/// 3×3 convolution, stride 1, zero padding 1, with bias. x: [n, cin, h, w] (xd),
/// w: [cout, cin, 3, 3], b: [cout] → y: [n, cout, h, w].
pub fn conv3x3_forward(x: &[f32], xd: Dims, w: &[f32], b: &[f32], cout: usize, y: &mut [f32]) {
    conv3x3_forward_concat(&[(x, xd.c)], xd, w, b, cout, false, y);
}

/// y = relu(conv3x3(x; w, b)), for inference with BatchNorm folded into w and b by the caller.
pub fn conv3x3_relu_forward(x: &[f32], xd: Dims, w: &[f32], b: &[f32], cout: usize, y: &mut [f32]) {
    conv3x3_forward_concat(&[(x, xd.c)], xd, w, b, cout, true, y);
}

/// conv3x3_forward of the channel concatenation of `parts` ([n, c_i, h, w] each, in order;
/// xd.c = Σ c_i) without materialising it. `relu` as in conv3x3_relu_forward.
pub fn conv3x3_forward_concat(
    parts: &[(&[f32], usize)],
    xd: Dims,
    w: &[f32],
    b: &[f32],
    cout: usize,
    relu: bool,
    y: &mut [f32],
) {
    Plan::auto().forward(parts, xd, 9, w, b, cout, relu, y);
}

/// Gradients of conv3x3_forward. dy: [n, cout, h, w]. dx (if Some): [n, cin, h, w];
/// dw: [cout, cin, 3, 3]; db: [cout]. All overwritten; dw and db are bit-reproducible.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_backward(
    x: &[f32],
    xd: Dims,
    w: &[f32],
    dy: &[f32],
    cout: usize,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
) {
    conv3x3_backward_concat(&[(x, xd.c)], xd, w, dy, cout, &mut [dx], dw, db);
}

/// Gradients of conv3x3_forward_concat: dx[i] (if Some) receives the gradient of parts[i].
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_backward_concat(
    parts: &[(&[f32], usize)],
    xd: Dims,
    w: &[f32],
    dy: &[f32],
    cout: usize,
    dx: &mut [Option<&mut [f32]>],
    dw: &mut [f32],
    db: &mut [f32],
) {
    Plan::auto().backward(parts, xd, 9, w, dy, cout, dx, dw, db);
}

/// 1×1 convolution with bias: w [cout, cin] (PyTorch's [cout, cin, 1, 1] flattened),
/// x [n, cin, h, w] → y [n, cout, h, w].
pub fn conv1x1_forward(x: &[f32], xd: Dims, w: &[f32], b: &[f32], cout: usize, y: &mut [f32]) {
    Plan::auto().forward(&[(x, xd.c)], xd, 1, w, b, cout, false, y);
}

/// Gradients of conv1x1_forward; shapes as in conv3x3_backward with w [cout, cin].
#[allow(clippy::too_many_arguments)]
pub fn conv1x1_backward(
    x: &[f32],
    xd: Dims,
    w: &[f32],
    dy: &[f32],
    cout: usize,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
) {
    Plan::auto().backward(&[(x, xd.c)], xd, 1, w, dy, cout, &mut [dx], dw, db);
}
