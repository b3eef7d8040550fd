//! The op table, in the manner of ggml's test-backend-ops: every op × shape on every backend against `m2unet::reference`, one printed row each.
//!
//! Backends: `cpu` (the f32 operators of src/cpu/ops), `emu` (the CUDA kernels of kernels/*.cu
//! on the emulator) and, with M2UNET_TEST_DEVICE=cuda, `cuda` (the same kernels on the GPU).
//! Only the ops the CUDA engine has kernels for get device rows; backward-only ops are CPU rows.
//! Every device buffer sits between guard sentinels; a kernel that writes into them fails its
//! row.
//!
//! The error of a row is max |got − ref| / max |ref| over its output (the absolute error when the
//! reference is all zero). A row fails when that exceeds its tolerance, when an output is not
//! finite or when a guard was overwritten. The tolerances are explained where they are set:
//! the constants at the top of `cpu` for the CPU rows, the rounding bounds in `device` for the
//! device rows.

mod conv_grad_kernels;
mod conv_kernels;
mod conv_up_kernels;
mod conv_wgmma_kernels;
mod cpu;
#[path = "../cuda_common/mod.rs"]
mod cuda_common;
mod device;
mod head_grad_kernels;
mod head_kernels;
mod norm_grad_kernels;
mod norm_kernels;
mod optim_kernels;

use m2unet::cuda::DeviceKind;

/// One op × backend × shape: its measured error and tolerance.
struct Row {
    op: String,
    backend: &'static str,
    shape: String,
    err: f64,
    tol: f64,
    /// Guard bytes a kernel overwrote.
    damage: usize,
}

impl Row {
    fn passed(&self) -> bool {
        self.err.is_finite() && self.err <= self.tol && self.damage == 0
    }
}

/// The rows of one backend, as they are measured.
pub struct Table {
    backend: &'static str,
    rows: Vec<Row>,
}

impl Table {
    fn new(backend: &'static str) -> Table {
        Table {
            backend,
            rows: vec![],
        }
    }

    /// A row of a CPU op or a kernel whose guards held.
    pub fn add(&mut self, op: &str, shape: &str, err: f64, tol: f64) {
        self.add_guarded(op, shape, err, tol, 0);
    }

    /// A device row, with the guard bytes its kernels overwrote.
    pub fn add_guarded(&mut self, op: &str, shape: &str, err: f64, tol: f64, damage: usize) {
        self.rows.push(Row {
            op: op.to_string(),
            backend: self.backend,
            shape: shape.to_string(),
            err,
            tol,
            damage,
        });
    }
}

/// max |got − want| / max |want| (the absolute error when want is all zero); infinite when
/// a value is not finite.
pub fn max_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "output length");
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let diff = (got.iter().zip(want))
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max);
    let scale = max_abs(want);
    if scale > 0.0 {
        diff / scale
    } else {
        diff
    }
}

pub fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// The device kinds to run: the emulator always, the GPU too with M2UNET_TEST_DEVICE=cuda.
fn device_kinds() -> Vec<DeviceKind> {
    match cuda_common::device_kind() {
        DeviceKind::Gpu => vec![DeviceKind::Emu, DeviceKind::Gpu],
        DeviceKind::Emu => vec![DeviceKind::Emu],
    }
}

#[test]
fn every_op_on_every_backend_matches_the_reference() {
    let mut tables = vec![cpu::table()];
    for kind in device_kinds() {
        tables.push(device::table(kind));
    }
    let rows: Vec<&Row> = tables.iter().flat_map(|t| &t.rows).collect();
    println!(
        "{:<30} {:<5} {:<40} {:>9} {:>9}",
        "op", "back", "shape", "error", "tolerance"
    );
    for r in &rows {
        let verdict = match (r.passed(), r.damage) {
            (true, _) => "ok".to_string(),
            (false, 0) => "FAIL".to_string(),
            (false, d) => format!("FAIL: {d} guard bytes overwritten"),
        };
        println!(
            "{:<30} {:<5} {:<40} {:>9.2e} {:>9.2e}  {verdict}",
            r.op, r.backend, r.shape, r.err, r.tol
        );
    }
    let failed: Vec<String> = (rows.iter().filter(|r| !r.passed()))
        .map(|r| format!("{} {} {}", r.op, r.backend, r.shape))
        .collect();
    println!("{} rows, {} failed", rows.len(), failed.len());
    assert!(failed.is_empty(), "rows over their tolerance: {failed:#?}");
}
