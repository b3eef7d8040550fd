//! The device path end to end, on the emulator (or a GPU with M2UNET_TEST_DEVICE=cuda):
//! upload, launch, download of the simplest kernel against a formula. Every kernel against
//! `m2unet::reference` is in the op table (tests/ops_table).

mod cuda_common;

use cuda_common::*;
use m2unet::cuda::kernels::*;

#[test]
fn emulator_round_trip_bn_apply() {
    // The simplest kernel end to end: upload, launch, download, compared with y = relu(x·s + t).
    let mut dev = device();
    let (n, h, w, c) = (2, 3, 5, 16);
    let mut r = rng(1);
    let x = round_f16(&uniform(&mut r, n * h * w * c, -2.0, 2.0));
    let scale = uniform(&mut r, c, -1.5, 1.5);
    let shift = uniform(&mut r, c, -0.5, 0.5);
    let gx = Guarded::with(&mut dev, &to_f16(&x));
    let gs = Guarded::with(&mut dev, &scale);
    let gt = Guarded::with(&mut dev, &shift);
    let gy = Guarded::new(&mut dev, x.len() * 2);
    let p = BnApplyParams {
        x: gx.addr(),
        scale: gs.addr(),
        shift: gt.addr(),
        y: gy.addr(),
        n: n as i32,
        h: h as i32,
        w: w as i32,
        c: c as i32,
        ..Default::default()
    };
    bn_apply(&dev, &p).unwrap();
    let got = gy.read_f16(&dev);
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| (v * scale[i % c] + shift[i % c]).max(0.0))
        .collect();
    let e = nerr(&want, &got);
    println!("bn_apply round trip: normalised error {e:.3e} (threshold 1e-6)");
    assert!(e < 1e-6);
    gy.check_guards(&dev, "bn_apply y");
}
