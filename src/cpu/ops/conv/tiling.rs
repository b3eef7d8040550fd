//! How the convolution drivers cut their work: pixel tiles, channel blocks, scratch row strides,
//! the per-thread scratch, and the output pointer shared by tasks that write disjoint parts.

use super::NR;
use std::cell::RefCell;

thread_local! {
    /// Per-thread scratch for unfolded tiles, kept between calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch, aligned to 64 bytes.
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len + 16 {
            buf.resize(len + 16, 0.0);
        }
        let off = buf.as_ptr().align_offset(64).min(15);
        f(&mut buf[off..off + len])
    })
}

/// A raw output pointer shared by tasks that write disjoint regions.
#[derive(Clone, Copy)]
pub(super) struct SharedMut(pub(super) *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Safety: `off` within the allocation, and the caller alone writes what it addresses.
    pub(super) unsafe fn add(self, off: usize) -> *mut f32 {
        self.0.add(off)
    }
}

/// One image's pixels cut into `count` tiles of `len` pixels (a multiple of NR; the last tile
/// may be shorter), stored `ld` floats apart in an unfolded tile.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tiling {
    pub(super) len: usize,
    pub(super) count: usize,
    pub(super) ld: usize,
}

impl Tiling {
    pub(super) fn new(hw: usize, target: usize) -> Tiling {
        let count = hw.div_ceil(target.max(NR));
        let len = hw.div_ceil(count).next_multiple_of(NR);
        let count = hw.div_ceil(len);
        Tiling {
            len,
            count,
            ld: row_stride(len),
        }
    }

    /// First pixel and pixel count of tile `t` of an image of `hw` pixels.
    pub(super) fn range(&self, t: usize, hw: usize) -> (usize, usize) {
        let p0 = t * self.len;
        (p0, self.len.min(hw - p0))
    }
}

/// Size of the blocks, a multiple of `unit`, that cut `m` rows into enough blocks for
/// `other_tasks` × blocks to reach `min_tasks` where `m` allows it.
pub(super) fn block_size(m: usize, unit: usize, other_tasks: usize, min_tasks: usize) -> usize {
    let blocks = min_tasks
        .div_ceil(other_tasks.max(1))
        .clamp(1, m.div_ceil(unit));
    m.div_ceil(blocks).next_multiple_of(unit)
}

/// A scratch row stride of at least `len` floats: a multiple of 16, and not of 256 (a multiple
/// of 1 KiB would map all rows onto the same cache sets).
pub(super) fn row_stride(len: usize) -> usize {
    let ld = len.next_multiple_of(16);
    if ld.is_multiple_of(256) {
        ld + 16
    } else {
        ld
    }
}
