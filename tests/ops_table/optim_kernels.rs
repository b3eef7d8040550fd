//! Device rows of kernels/optim.cu: grad_check (inf/NaN detection), adamw against the CPU's optim::adamw_step (loss-scaled gradients, a skipped step) and amp_update's loss-scale sequences.

use crate::cuda_common::*;
use crate::device::ACC;
use crate::{max_abs, max_err, Table};
use m2unet::config::TrainConfig;
use m2unet::cpu::ops::optim::adamw_step;
use m2unet::cuda::kernels::*;
use m2unet::cuda::Device;

pub fn rows(dev: &mut Device, t: &mut Table) {
    grad_check_rows(dev, t);
    adamw_rows(dev, t);
    amp_update_rows(dev, t);
}

fn read_amp(dev: &Device, g: &Guarded) -> AmpState {
    bytemuck::pod_read_unaligned(&g.read_u8(dev))
}

/// 0 when the states are equal, else 1.
fn state_err(got: &AmpState, want: &AmpState) -> f64 {
    f64::from(u8::from(got != want))
}

/// grad_check: found_inf becomes 1 exactly when a gradient is ±inf or NaN (f32::MAX is
/// finite), and is never cleared; nothing else of the state changes.
fn grad_check_rows(dev: &mut Device, t: &mut Table) {
    let cases = [
        (1000, None, 0),
        (1000, Some((999, f32::INFINITY)), 0),
        (300_001, Some((150_000, f32::NAN)), 0),
        (300_001, Some((7, f32::NEG_INFINITY)), 0),
        (300_001, None, 0),
        (17, None, 1),
    ];
    for (len, poison, found0) in cases {
        let mut r = rng(len as u64 + found0 as u64);
        let mut g = uniform(&mut r, len, -1e4, 1e4);
        g[1] = f32::MAX;
        if let Some((i, v)) = poison {
            g[i] = v;
        }
        let start = AmpState {
            found_inf: found0,
            steps: 3,
            ..AmpState::default()
        };
        let (gg, gamp) = (Guarded::with(dev, &g), Guarded::with(dev, &[start]));
        let p = GradCheckParams {
            g: gg.addr(),
            amp: gamp.addr(),
            len: len as i32,
            pad_: 0,
        };
        grad_check(dev, &p).unwrap();
        let want = AmpState {
            found_inf: i32::from(poison.is_some() || found0 == 1),
            ..start
        };
        let bad = poison.map_or("none".to_string(), |(i, v)| format!("{v} at {i}"));
        let shape = format!("len {len}, {bad}, found_inf {found0}");
        let mut run = crate::device::Launch::new(t, shape, dev, &[&gg, &gamp]);
        run.add("grad_check", state_err(&read_amp(dev, &gamp), &want), 0.0);
    }
}

/// grad_check → adamw → amp_update for five steps (growth every 2 clean steps) with
/// loss-scaled gradients g·S, step 3 poisoned by an inf: against the CPU's adamw_step on g
/// (S is a power of two, so grad/S = g exactly) with t counting the clean steps, the learning
/// rate read from the state.
///
/// m and v: the same f32 operations in the same order (the kernel's round-to-nearest
/// intrinsics forbid FMA contraction), so they must be bit-identical. The parameters too, on
/// the emulator; a GPU's double pow (2 ulps) may move the step size and sqrt(1 − β2^t) by one
/// f32 ulp each, which changes a step's update by at most 2·ACC relative and the rounding of p
/// by one ulp: per clean step at most 2·ACC·(max|Δp| + max|p|), accumulated over the steps.
/// The skipped step must leave p, m and v bit for bit.
fn adamw_rows(dev: &mut Device, t: &mut Table) {
    let cfg = TrainConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        ..TrainConfig::default()
    };
    // (scale, the step's scale, good_steps, steps, skipped, last_skipped); lr stays.
    let amp_step = |scale, last_scale, good, steps, skipped, last| AmpState {
        scale,
        good_steps: good,
        steps,
        skipped,
        last_skipped: last,
        lr: cfg.lr,
        last_scale,
        ..AmpState::default()
    };
    let want_states = [
        amp_step(1024.0, 1024.0, 1, 1, 0, 0),
        amp_step(2048.0, 1024.0, 0, 2, 0, 0),
        amp_step(1024.0, 2048.0, 0, 2, 1, 1),
        amp_step(1024.0, 1024.0, 1, 3, 1, 0),
        amp_step(2048.0, 1024.0, 0, 4, 1, 0),
    ];
    for len in [1000, 4099] {
        let mut r = rng(len as u64 * 7);
        let mut p = uniform(&mut r, len, -1.0, 1.0);
        let (mut m, mut v) = (vec![0f32; len], vec![0f32; len]);
        let gp = Guarded::with(dev, &p);
        let (gm, gv) = (Guarded::with(dev, &m), Guarded::with(dev, &v));
        let gamp = Guarded::with(
            dev,
            &[AmpState {
                scale: 1024.0,
                lr: cfg.lr,
                ..AmpState::default()
            }],
        );
        let gg = Guarded::new(dev, len * 4);
        let (mut t_cpu, mut p_bound, mut skip_err, mut state_errs) = (0u64, 0.0f64, 0.0, 0.0);
        for (step, want_state) in want_states.iter().enumerate() {
            let g = uniform(&mut r, len, -1.0, 1.0);
            let scale = read_amp(dev, &gamp).scale;
            let mut scaled: Vec<f32> = g.iter().map(|v| v * scale).collect();
            let poisoned = step == 2;
            if poisoned {
                scaled[len / 2] = f32::INFINITY;
            }
            dev.upload(gg.ptr, &scaled).unwrap();
            let (p_dev0, m_dev0, v_dev0) = (gp.read_f32(dev), gm.read_f32(dev), gv.read_f32(dev));
            grad_check(
                dev,
                &GradCheckParams {
                    g: gg.addr(),
                    amp: gamp.addr(),
                    len: len as i32,
                    pad_: 0,
                },
            )
            .unwrap();
            let ap = AdamWParams {
                params: gp.addr(),
                grads: gg.addr(),
                m: gm.addr(),
                v: gv.addr(),
                amp: gamp.addr(),
                len: len as i32,
                pad_: 0,
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
            };
            adamw(dev, &ap).unwrap();
            let up = AmpUpdateParams {
                amp: gamp.addr(),
                growth_interval: 2,
                growth: 2.0,
                backoff: 0.5,
                pad_: 0,
            };
            amp_update(dev, &up).unwrap();
            state_errs += state_err(&read_amp(dev, &gamp), want_state);
            if poisoned {
                let same = |a: &[f32], b: &[f32]| {
                    a.iter()
                        .zip(b)
                        .filter(|(x, y)| x.to_bits() != y.to_bits())
                        .count()
                };
                skip_err += (same(&gp.read_f32(dev), &p_dev0)
                    + same(&gm.read_f32(dev), &m_dev0)
                    + same(&gv.read_f32(dev), &v_dev0)) as f64;
            } else {
                let before = to_f64(&p);
                t_cpu += 1;
                adamw_step(&mut p, &g, &mut m, &mut v, t_cpu, &cfg);
                let moved = (p.iter().zip(&before))
                    .map(|(a, b)| (*a as f64 - b).abs())
                    .fold(0.0, f64::max);
                p_bound += 2.0 * ACC * (moved + max_abs(&to_f64(&p)));
            }
        }
        let shape = format!("len {len}, 5 steps, S 1024, step 3 inf");
        let bufs = [&gp, &gm, &gv, &gamp, &gg];
        let mut run = crate::device::Launch::new(t, shape, dev, &bufs);
        run.output(
            "adamw params vs cpu",
            &gp.read_f32(dev),
            &to_f64(&p),
            0.0,
            p_bound,
        );
        run.add(
            "adamw m vs cpu",
            max_err(&gm.read_f32(dev), &to_f64(&m)),
            0.0,
        );
        run.add(
            "adamw v vs cpu",
            max_err(&gv.read_f32(dev), &to_f64(&v)),
            0.0,
        );
        run.add("adamw skipped step: p, m, v bits", skip_err, 0.0);
        run.add("adamw amp states (steps wrong)", state_errs, 0.0);
    }
}

/// amp_update alone over a sequence of clean and overflowed steps (growth interval 3): the
/// step's scale is recorded, the scale halves and the step is skipped on overflow, doubles
/// after 3 clean steps in a row; found_inf is cleared. Each state is checked; the error counts the wrong ones.
fn amp_update_rows(dev: &mut Device, t: &mut Table) {
    // (found_inf, then: scale, good_steps, steps, skipped, last_skipped)
    let seq: [(i32, f32, i32, i32, i32, i32); 8] = [
        (0, 65536.0, 1, 1, 0, 0),
        (0, 65536.0, 2, 2, 0, 0),
        (1, 32768.0, 0, 2, 1, 1),
        (0, 32768.0, 1, 3, 1, 0),
        (0, 32768.0, 2, 4, 1, 0),
        (0, 65536.0, 0, 5, 1, 0),
        (1, 32768.0, 0, 5, 2, 1),
        (1, 16384.0, 0, 5, 3, 1),
    ];
    let gamp = Guarded::with(dev, &[AmpState::default()]);
    let mut wrong = 0.0;
    for (found, scale, good, steps, skipped, last) in seq {
        let mut s = read_amp(dev, &gamp);
        s.found_inf = found;
        dev.upload(gamp.ptr, &[s]).unwrap();
        let p = AmpUpdateParams {
            amp: gamp.addr(),
            growth_interval: 3,
            growth: 2.0,
            backoff: 0.5,
            pad_: 0,
        };
        amp_update(dev, &p).unwrap();
        let want = AmpState {
            scale,
            found_inf: 0,
            good_steps: good,
            steps,
            skipped,
            last_skipped: last,
            lr: 0.0,
            last_scale: s.scale,
        };
        wrong += state_err(&read_amp(dev, &gamp), &want);
    }
    let shape = "8 steps, interval 3, inf at 3, 7, 8".to_string();
    let mut run = crate::device::Launch::new(t, shape, dev, &[&gamp]);
    run.add("amp_update (states wrong)", wrong, 0.0);
}
