//! Criterion bench of the CPU convolutions: GFLOP/s of the tiled 3×3 forward and backward, against a whole-image im2col + `gemm` baseline.

use criterion::{black_box, Criterion};
use m2unet::cpu::ops::conv::{conv3x3_backward, conv3x3_forward};
use m2unet::cpu::ops::matmul::{matmul, Operand, Parallelism};
use m2unet::cpu::ops::Dims;
use rayon::prelude::*;
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// (label, n, cin, cout, side)
const CASES: [(&str, usize, usize, usize, usize); 3] = [
    ("64→64 256² n=2", 2, 64, 64, 256),
    ("512→512 16² n=8", 8, 512, 512, 16),
    ("1→64 256² n=8", 8, 1, 64, 256),
];

/// Deterministic pseudo-random values in [-1, 1).
fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).max(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Baseline: y = w · im2col(x) + b with the whole image unfolded ([cin·9, h·w]) and one
/// multi-threaded `gemm` call per image.
fn im2col_gemm_forward(
    x: &[f32],
    d: Dims,
    w: &[f32],
    b: &[f32],
    cout: usize,
    col: &mut [f32],
    y: &mut [f32],
) {
    let (h, wd, hw, k) = (d.h, d.w, d.hw(), d.c * 9);
    for i in 0..d.n {
        let xi = &x[i * d.c * hw..(i + 1) * d.c * hw];
        col.par_chunks_mut(hw).enumerate().for_each(|(r, row)| {
            let (ci, ky, kx) = (r / 9, r % 9 / 3, r % 3);
            for oy in 0..h {
                for ox in 0..wd {
                    let (sy, sx) = (oy + ky, ox + kx);
                    row[oy * wd + ox] = if sy >= 1 && sy <= h && sx >= 1 && sx <= wd {
                        xi[ci * hw + (sy - 1) * wd + sx - 1]
                    } else {
                        0.0
                    };
                }
            }
        });
        let yi = &mut y[i * cout * hw..(i + 1) * cout * hw];
        for (co, row) in yi.chunks_exact_mut(hw).enumerate() {
            row.fill(b[co]);
        }
        // SAFETY: yi [cout, hw] += w [cout, k] · col [k, hw], all row-major and in bounds.
        unsafe {
            matmul(
                (cout, hw, k),
                (yi.as_mut_ptr(), hw),
                true,
                Operand::rows(w.as_ptr(), k),
                Operand::rows(col.as_ptr(), hw),
                Parallelism::Rayon(0),
            );
        }
    }
}

thread_local! {
    /// Median seconds per call of each benchmark, for the summary.
    static RESULTS: RefCell<Vec<(String, f64, f64)>> = const { RefCell::new(Vec::new()) };
}

/// Benchmarks `f`, recording its median time per call and the GFLOP/s it reaches.
fn bench(c: &mut Criterion, name: &str, flops: f64, mut f: impl FnMut()) {
    let mut samples: Vec<f64> = Vec::new();
    c.bench_function(name, |bencher| {
        bencher.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            let e = t.elapsed();
            samples.push(e.as_secs_f64() / iters as f64);
            e
        })
    });
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    RESULTS.with(|r| {
        r.borrow_mut()
            .push((name.to_string(), median, flops / median / 1e9))
    });
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    for (label, n, cin, cout, side) in CASES {
        let d = Dims::new(n, cin, side, side);
        let x = values(d.len(), 1);
        let w = values(cout * cin * 9, 2);
        let b = values(cout, 3);
        let dy = values(n * cout * d.hw(), 4);
        let mut y = vec![0.0; n * cout * d.hw()];
        let (mut dx, mut dw, mut db) = (vec![0.0; d.len()], vec![0.0; w.len()], vec![0.0; cout]);
        let flops = 2.0 * (n * cout * cin * 9 * d.hw()) as f64;
        bench(&mut c, &format!("conv3x3 forward {label}"), flops, || {
            conv3x3_forward(black_box(&x), d, &w, &b, cout, &mut y)
        });
        let mut col = vec![0.0; cin * 9 * d.hw()];
        bench(
            &mut c,
            &format!("im2col+gemm forward {label}"),
            flops,
            || im2col_gemm_forward(black_box(&x), d, &w, &b, cout, &mut col, &mut y),
        );
        let dx_opt = cin > 1;
        let bwd_flops = if dx_opt { 2.0 * flops } else { flops };
        bench(
            &mut c,
            &format!("conv3x3 backward {label}"),
            bwd_flops,
            || {
                conv3x3_backward(
                    black_box(&x),
                    d,
                    &w,
                    &dy,
                    cout,
                    dx_opt.then_some(&mut dx[..]),
                    &mut dw,
                    &mut db,
                )
            },
        );
    }
    c.final_summary();
    println!(
        "\n{:<44} {:>12} {:>10}",
        "benchmark", "median ms", "GFLOP/s"
    );
    RESULTS.with(|r| {
        let r = r.borrow();
        for (name, t, g) in r.iter() {
            println!("{name:<44} {:>12.3} {g:>10.1}", t * 1e3);
        }
        for pair in r.chunks(3) {
            println!(
                "{}: tiled forward / im2col+gemm baseline = {:.2}×",
                pair[0].0,
                pair[0].2 / pair[1].2
            );
        }
    });
}
