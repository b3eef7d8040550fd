//! Rust twins of kernels/amp.cuh and kernels/optim.cu (loss-scaling state, gradient check, AdamW, loss-scale update) and their launch wrappers.

use super::{blocks, check_i32, launch_1d, DevAddr, Device, SMS};
use anyhow::Result;
use bytemuck::{Pod, Zeroable};

/// Dynamic loss scaling (PyTorch GradScaler) and AdamW's step count, on the device.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct AmpState {
    /// The loss scale S.
    pub scale: f32,
    /// Set by grad_check when a gradient is inf/NaN; cleared by amp_update.
    pub found_inf: i32,
    /// Clean steps since the last growth or skip.
    pub good_steps: i32,
    /// AdamW steps taken (t); skipped steps do not count.
    pub steps: i32,
    /// Total skipped steps.
    pub skipped: i32,
    /// 1 when the last step was skipped.
    pub last_skipped: i32,
    /// AdamW's learning rate, written by the host before each step (a schedule changes it; a
    /// captured step graph cannot carry it by value).
    pub lr: f32,
    /// The loss scale the last step's gradients carried (set by amp_update).
    pub last_scale: f32,
}

impl Default for AmpState {
    /// PyTorch GradScaler's initial scale, 2^16, and nothing counted.
    fn default() -> Self {
        AmpState {
            scale: 65536.0,
            ..Zeroable::zeroed()
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct GradCheckParams {
    pub g: DevAddr,
    pub amp: DevAddr,
    pub len: i32,
    pub pad_: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AdamWParams {
    pub params: DevAddr,
    pub grads: DevAddr,
    pub m: DevAddr,
    pub v: DevAddr,
    pub amp: DevAddr,
    pub len: i32,
    pub pad_: i32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AmpUpdateParams {
    pub amp: DevAddr,
    pub growth_interval: i32,
    pub growth: f32,
    pub backoff: f32,
    pub pad_: i32,
}

const _: () = {
    assert!(std::mem::size_of::<AmpState>() == 32);
    assert!(std::mem::size_of::<GradCheckParams>() == 24);
    assert!(std::mem::size_of::<AdamWParams>() == 64);
    assert!(std::mem::size_of::<AmpUpdateParams>() == 24);
};

/// Blocks of 256 threads for a grid-stride pass over `len` values: at most eight per SM.
fn stride_grid(len: usize) -> [u32; 3] {
    [blocks(len, 256).clamp(1, 8 * SMS as u32), 1, 1]
}

/// Sets `amp.found_inf` when any of the `len` gradients is inf or NaN (never clears it).
pub fn grad_check(dev: &Device, p: &GradCheckParams) -> Result<()> {
    check_i32("grad_check", p.len as usize)?;
    dev.launch("grad_check", stride_grid(p.len as usize), [256, 1, 1], p)
}

/// One AdamW step of grad / S at `amp.lr` with t = steps + 1, or nothing when `amp.found_inf`
/// is set.
pub fn adamw(dev: &Device, p: &AdamWParams) -> Result<()> {
    check_i32("adamw", p.len as usize)?;
    dev.launch("adamw", stride_grid(p.len as usize), [256, 1, 1], p)
}

/// The loss-scale update after adamw (one thread); records the step's scale in `last_scale`.
pub fn amp_update(dev: &Device, p: &AmpUpdateParams) -> Result<()> {
    launch_1d(dev, "amp_update", 1, 1, p)
}
