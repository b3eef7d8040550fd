//! The CUDA trainer's backward buffers for one batch shape, carved from one allocation:
//! every unit's output gradient, the gradients of a conv output and an input part, and the
//! reductions' fp32 scratch.

use super::CudaTrainer;
use crate::cuda::device::DevPtr;
use crate::cuda::engine::{Carve, ALIGN};
use crate::cuda::kernels::*;
use crate::cuda::weights::pad8;
use crate::model::{Arch, ConvUnit, Src};
use anyhow::Result;

/// Buffers of the backward for one batch shape, carved from one allocation.
pub(super) struct Scratch {
    pub(super) m: usize,
    pub(super) p: usize,
    pub(super) bags: usize,
    pub(super) base: DevPtr,
    /// Every unit's output gradient (fp32 NHWC), contiguous so that one memset clears them.
    pub(super) dy: Vec<usize>,
    /// The backward step (0: the heads, then 1 + n − 1 − i for unit i) at which each dY is
    /// first written; dYs whose lives do not overlap share memory, so each is zeroed then.
    pub(super) dy_first: Vec<usize>,
    /// The gradient of a unit's conv output (fp16), of one input part (fp16), the upsampled
    /// input of a unit (fp16).
    pub(super) dz: usize,
    pub(super) dpart: usize,
    pub(super) up: usize,
    /// fp32 scratch of the reductions (wgrad splits, BN sums, split-K, seg loss, concepts).
    pub(super) wgrad: usize,
    pub(super) bn: usize,
    pub(super) splitk: usize,
    pub(super) seg: usize,
    pub(super) concepts: usize,
    pub(super) seg_labels: usize,
    pub(super) cls_labels: usize,
    pub(super) class_weights: usize,
    pub(super) losses: usize,
    pub(super) dcls: usize,
    pub(super) dv: usize,
    pub(super) dg: usize,
    pub(super) dt: usize,
    pub(super) de: usize,
    pub(super) dq: usize,
    pub(super) dzm: usize,
}

impl Scratch {
    pub(super) fn at(&self, off: usize) -> u64 {
        self.base.offset(off).0
    }
}

impl CudaTrainer {
    /// Sizes the backward's buffers for m patches of side p in `bags` bags.
    pub(super) fn ensure_scratch(&mut self, m: usize, p: usize, bags: usize) -> Result<()> {
        if self
            .scratch
            .as_ref()
            .is_some_and(|s| s.m == m && s.p == p && s.bags == bags)
        {
            return Ok(());
        }
        if let Some(s) = self.scratch.take() {
            self.eng.dev.free(s.base)?;
        }
        let arch = &self.eng.arch;
        let mut carve = Carve::default();
        let mut take = |bytes: usize| carve.take(bytes);
        let px = |level: usize| m * (p >> level) * (p >> level);
        let sizes: Vec<usize> = (arch.units.iter())
            .map(|u| (px(u.level) * pad8(u.cout) * 4).next_multiple_of(ALIGN))
            .collect();
        let (dy_first, lives) = dy_lives(arch);
        let (places, dy_bytes) = place(&sizes, &lives);
        let dy_base = take(dy_bytes);
        let dy: Vec<usize> = places.iter().map(|&o| dy_base + o).collect();
        let (mut dz, mut dpart, mut up) = (0, 0, 0);
        let (mut wgrad, mut bn, mut splitk) = (0, 0, 0);
        for u in &arch.units {
            let (pixels, cz) = (px(u.level), pad8(u.cout));
            dz = dz.max(pixels * cz * 2);
            bn = bn.max(bn_bwd_partial_len(pixels, cz));
            for &(src, c) in &u.inputs {
                let cx = pad8(c);
                if src == Src::Input {
                    wgrad = wgrad.max(wgrad_first_partial_len(&wgrad_first_shape(u, c, m, p)));
                    continue;
                }
                dpart = dpart.max(pixels * cx * 2);
                if matches!(src, Src::Upsampled(_)) {
                    up = up.max(pixels * cx * 2);
                }
                wgrad = wgrad.max(wgrad_partial_len(&wgrad_shape(u, 0, c, m, p)));
                let s = conv_splits(pixels, cx, 9 * cz);
                if s > 1 {
                    splitk = splitk.max(s * pixels * cx);
                }
            }
        }
        let mil = &arch.mil;
        let (k1, k2, classes) = (mil.emb_proj.fout, mil.img_proj.fout, mil.classifier.fout);
        let last = &arch.units[arch.seg.src];
        let seg_p = SegLossParams {
            n: m as i32,
            hw: (p * p) as i32,
            c: pad8(last.cout) as i32,
            c_real: last.cout as i32,
            classes: arch.seg.classes as i32,
            ..Default::default()
        };
        let side = p >> mil.level;
        let con_p = ConceptsBwdParams {
            m: m as i32,
            inst: (side * side) as i32,
            c: pad8(mil.channels) as i32,
            c_real: mil.channels as i32,
            k: k1 as i32,
            ..Default::default()
        };
        let s = Scratch {
            m,
            p,
            bags,
            base: DevPtr::NULL,
            dy,
            dy_first,
            dz: take(dz),
            dpart: take(dpart),
            up: take(up),
            wgrad: take(wgrad * 4),
            bn: take(bn * 4),
            splitk: take(splitk * 4),
            seg: take(seg_loss_partial_len(&seg_p) * 4),
            concepts: take(concepts_bwd_partial_len(&con_p) * 4),
            seg_labels: take(m * p * p * 4),
            cls_labels: take(bags * 4),
            class_weights: take(classes * 4),
            losses: take(4 * 4),
            dcls: take(bags * classes * 4),
            dv: take(bags * k2 * 4),
            dg: take(bags * k2 * 4),
            dt: take(m * k2 * 4),
            de: take(m * k1 * 4),
            dq: take(m * k1 * 4),
            dzm: take(m * k1 * 4),
        };
        let base = self.eng.dev.alloc(carve.len())?;
        self.scratch = Some(Scratch { base, ..s });
        Ok(())
    }

    pub(super) fn scratch(&self) -> &Scratch {
        self.scratch.as_ref().expect("scratch sized")
    }
}

/// The weight gradient of unit `u`'s input part of `c` real channels from real channel `c_off`
/// on, for m patches of side p, its buffers unset: what the backward launches and what its
/// scratch is sized for.
pub(super) fn wgrad_shape(u: &ConvUnit, c_off: usize, c: usize, m: usize, p: usize) -> WgradParams {
    let side = p >> u.level;
    let (cz, cx) = (pad8(u.cout), pad8(c));
    WgradParams {
        n: m as i32,
        h: side as i32,
        w: side as i32,
        cz: cz as i32,
        cx: cx as i32,
        cout: u.cout as i32,
        cin: u.cin() as i32,
        c_off: c_off as i32,
        c_real: c as i32,
        splits: wgrad_splits(m * side * side, cz, cx) as i32,
        ..Default::default()
    }
}

/// The first layer's weight gradient (`c` input channels), as [`wgrad_shape`].
pub(super) fn wgrad_first_shape(u: &ConvUnit, c: usize, m: usize, p: usize) -> WgradFirstParams {
    let side = p >> u.level;
    WgradFirstParams {
        n: m as i32,
        cin: c as i32,
        h: side as i32,
        w: side as i32,
        cz: pad8(u.cout) as i32,
        cout: u.cout as i32,
        splits: wgrad_first_splits(m * side * side) as i32,
        ..Default::default()
    }
}

/// When each unit's output gradient dY is alive during the backward, in steps (0: the heads;
/// unit i at step n − i): from its first consumer's step (the head or the later unit that
/// routes a gradient into it) to its own. Returns (first steps, [first, last] per unit).
fn dy_lives(arch: &Arch) -> (Vec<usize>, Vec<[usize; 2]>) {
    let n = arch.units.len();
    let step = |i: usize| n - i;
    let mut first: Vec<usize> = (0..n).map(step).collect();
    for j in [arch.seg.src, arch.mil.src] {
        first[j] = 0;
    }
    for (i, u) in arch.units.iter().enumerate() {
        for &(src, _) in &u.inputs {
            if let Src::Unit(j) | Src::Pooled(j) | Src::Upsampled(j) = src {
                first[j] = first[j].min(step(i));
            }
        }
    }
    let lives = (0..n).map(|j| [first[j], step(j)]).collect();
    (first, lives)
}

/// First-fit offsets for buffers of `sizes` alive over `lives` (inclusive step ranges): two
/// buffers share bytes only when one's life ends before the other's begins (a unit reads its
/// own dY at the start of its step, while it writes the dYs whose lives begin there). Returns
/// the offsets and the bytes in all.
fn place(sizes: &[usize], lives: &[[usize; 2]]) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&j| (lives[j][0], std::cmp::Reverse(sizes[j])));
    let mut offsets = vec![0usize; sizes.len()];
    let mut placed: Vec<usize> = vec![];
    for j in order {
        let overlaps = |k: usize| !(lives[k][1] < lives[j][0] || lives[j][1] < lives[k][0]);
        let mut busy: Vec<(usize, usize)> = (placed.iter().copied())
            .filter(|&k| overlaps(k))
            .map(|k| (offsets[k], offsets[k] + sizes[k]))
            .collect();
        busy.sort();
        let mut at = 0;
        for (a, b) in busy {
            if at + sizes[j] <= a {
                break;
            }
            at = at.max(b);
        }
        offsets[j] = at;
        placed.push(j);
    }
    let total = (0..sizes.len())
        .map(|j| offsets[j] + sizes[j])
        .max()
        .unwrap_or(0);
    (offsets, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn output_gradients_share_memory_only_when_their_lives_do_not_overlap() {
        // The paper network at P = 256 with 32 patches: each dY's bytes, placed by liveness.
        let arch = Arch::new(&ModelConfig::paper());
        let px = |level: usize| 32 * (256 >> level) * (256 >> level);
        let sizes: Vec<usize> = (arch.units.iter())
            .map(|u| px(u.level) * pad8(u.cout) * 4)
            .collect();
        let (first, lives) = dy_lives(&arch);
        let (offsets, total) = place(&sizes, &lives);
        let n = sizes.len();
        let mut clashes = 0;
        for a in 0..n {
            assert!(
                first[a] <= lives[a][1],
                "unit {a} is consumed before it is written"
            );
            for b in a + 1..n {
                let live_together = !(lives[a][1] < lives[b][0] || lives[b][1] < lives[a][0]);
                let share =
                    offsets[a] < offsets[b] + sizes[b] && offsets[b] < offsets[a] + sizes[a];
                clashes += (live_together && share) as usize;
            }
            assert!(offsets[a] + sizes[a] <= total);
        }
        let all: usize = sizes.iter().sum();
        println!(
            "paper network, P = 256, 32 patches: output gradients {:.2} GiB placed in {:.2} GiB",
            all as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        );
        assert_eq!(clashes, 0);
        assert!(total < all);
    }
}
