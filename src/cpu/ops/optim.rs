//! AdamW (as `torch.optim.AdamW`, decoupled weight decay) over flat f32 parameter buffers.

use crate::config::TrainConfig;
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// One AdamW step (t = step number, 1-based) over params, grads and the moments m, v, with
/// PyTorch's single-tensor operation order:
/// p ← p·(1 − lr·wd); m ← m + (1−β1)·(g − m); v ← v·β2 + (1−β2)·g·g;
/// p ← p − (lr/(1−β1^t)) · m / (sqrt(v)/sqrt(1−β2^t) + eps).
/// The scalar coefficients (decay factor, bias corrections, step size) are computed in f64
/// from the f32 config, as PyTorch does in Python floats; the per-element updates are f32.
/// Panics if t = 0 or the buffers differ in length.
pub fn adamw_step(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    t: u64,
    cfg: &TrainConfig,
) {
    assert!(t >= 1, "adamw_step: the step number is 1-based");
    let len = params.len();
    for (name, l) in [("grads", grads.len()), ("m", m.len()), ("v", v.len())] {
        assert_eq!(l, len, "adamw_step: {name} differs in length from params");
    }
    let (lr, b1, b2) = (cfg.lr as f64, cfg.beta1 as f64, cfg.beta2 as f64);
    let decay = (1.0 - lr * cfg.weight_decay as f64) as f32;
    let one_minus_b1 = (1.0 - b1) as f32;
    let one_minus_b2 = (1.0 - b2) as f32;
    let beta2 = cfg.beta2;
    let step_size = (lr / (1.0 - b1.powf(t as f64))) as f32;
    let bc2_sqrt = (1.0 - b2.powf(t as f64)).sqrt() as f32;
    let eps = cfg.eps;
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((pc, gc), (mc, vc))| {
            for (((p, &g), mi), vi) in pc.iter_mut().zip(gc).zip(mc.iter_mut()).zip(vc.iter_mut()) {
                *p *= decay;
                *mi += one_minus_b1 * (g - *mi);
                *vi = *vi * beta2 + one_minus_b2 * g * g;
                let denom = vi.sqrt() / bc2_sqrt + eps;
                *p += -step_size * (*mi / denom);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ops::tensor::test_support::*;

    #[test]
    fn adamw_two_steps_match_closed_form() {
        let cfg = TrainConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..TrainConfig::default()
        };
        let p0 = [1.0f32, -2.0, 0.5, 0.0];
        let g1 = [0.5f32, -0.25, 2e-9, 0.0];
        let g2 = [-1.0f32, 0.75, 0.0, 3.0];
        let mut p = p0;
        let (mut m, mut v) = ([0.0f32; 4], [0.0f32; 4]);
        adamw_step(&mut p, &g1, &mut m, &mut v, 1, &cfg);
        let after1 = p;
        adamw_step(&mut p, &g2, &mut m, &mut v, 2, &cfg);
        // Closed form, by hand, in f64 with lr = 0.01, wd = 0.1, β = (0.9, 0.999), eps = 1e-8:
        // step 1: m = 0.1·g1, v = 0.001·g1², m̂ = g1, v̂ = g1²,
        //   p1 = p0·(1 − 0.001) − 0.01·g1/(|g1| + 1e-8);
        // step 2: m = 0.09·g1 + 0.1·g2, v = 0.000999·g1² + 0.001·g2²,
        //   m̂ = m/0.19, v̂ = v/(1 − 0.999²) = v/0.001999,
        //   p2 = p1·(1 − 0.001) − 0.01·m̂/(sqrt(v̂) + 1e-8).
        let (lr, eps) = (cfg.lr as f64, cfg.eps as f64);
        let mut want1 = [0.0f64; 4];
        let mut want2 = [0.0f64; 4];
        for i in 0..4 {
            let (a, b, p) = (g1[i] as f64, g2[i] as f64, p0[i] as f64);
            want1[i] = p * (1.0 - lr * 0.1) - lr * a / (a.abs() + eps);
            let mh = (0.09 * a + 0.1 * b) / 0.19;
            let vh = (0.000999 * a * a + 0.001 * b * b) / 0.001999;
            want2[i] = want1[i] * (1.0 - lr * 0.1) - lr * mh / (vh.sqrt() + eps);
        }
        // Parameters move by about lr per step; measure the error relative to that motion.
        let err = |got: &[f32], want: &[f64], base: &[f64]| -> f64 {
            got.iter()
                .zip(want)
                .zip(base)
                .map(|((&g, &w), &b)| (g as f64 - w).abs() / (w - b).abs().max(lr))
                .fold(0.0, f64::max)
        };
        let e1 = err(&after1, &want1, &to_f64(&p0));
        let e2 = err(&p, &want2, &want1);
        println!("adamw: step 1 error {e1:.3e}, step 2 error {e2:.3e} (relative to the update)");
        println!("adamw: p1 {after1:?} vs {want1:?}; p2 {p:?} vs {want2:?}");
        assert!(e1 < 1e-4 && e2 < 1e-4, "adamw errors {e1} {e2}");
    }

    #[test]
    fn adamw_parallel_chunks_match_scalar_loop() {
        let mut g = rng(60);
        let len = 3 * CHUNK + 17;
        // A large lr keeps f32 rounding of p (about 1e-7) small against the update.
        let cfg = TrainConfig {
            lr: 1e-2,
            weight_decay: 0.05,
            ..TrainConfig::default()
        };
        let mut p = rand_vec(&mut g, len, -1.0, 1.0);
        let grads = rand_vec(&mut g, len, -1.0, 1.0);
        let mut m = rand_vec(&mut g, len, -0.1, 0.1);
        let mut v = rand_vec(&mut g, len, 0.0, 0.1);
        // Reference: the same update in f64, element by element, t = 7.
        let t = 7;
        let (lr, b1, b2, eps, wd) = (
            cfg.lr as f64,
            cfg.beta1 as f64,
            cfg.beta2 as f64,
            cfg.eps as f64,
            cfg.weight_decay as f64,
        );
        let want: Vec<f64> = (0..len)
            .map(|i| {
                let gi = grads[i] as f64;
                let mi = b1 * m[i] as f64 + (1.0 - b1) * gi;
                let vi = b2 * v[i] as f64 + (1.0 - b2) * gi * gi;
                let mh = mi / (1.0 - b1.powi(t));
                let vh = vi / (1.0 - b2.powi(t));
                p[i] as f64 * (1.0 - lr * wd) - lr * mh / (vh.sqrt() + eps)
            })
            .collect();
        let p_before = to_f64(&p);
        adamw_step(&mut p, &grads, &mut m, &mut v, t as u64, &cfg);
        let err = p
            .iter()
            .zip(&want)
            .zip(&p_before)
            .map(|((&g, &w), &b)| (g as f64 - w).abs() / (w - b).abs().max(lr))
            .fold(0.0, f64::max);
        println!("adamw over {len} values: max error {err:.3e} relative to the update");
        assert!(err < 1e-3, "adamw error {err}");
    }
}
