//! Cost of the CT pipeline around the network on a 512×512×300 volume: read, preprocess, write back.

use criterion::{criterion_group, criterion_main, Criterion};
use m2unet::data::phantom::{generate, FieldOfView, PhantomSpec, StoredDtype, XformKind};
use m2unet::data::preprocess::{
    keep_largest_components, label_patches, paste_patches, volume_patches, CanonicalCt,
    PreprocessConfig,
};
use m2unet::io::nifti::{read_volume, write_label_map};
use std::time::Duration;

fn pipeline(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let spec = PhantomSpec {
        shape: [512, 512, 300],
        spacing: [0.7, 0.7, 1.0],
        orientation: "LPS".into(),
        dtype: StoredDtype::Int16,
        xform: XformKind::Both,
        noise_hu: 15.0,
        severe: true,
        fov: FieldOfView::Chest,
        frame: FieldOfView::Chest.frame(),
    };
    let phantom = generate(&spec, 1);
    phantom
        .write(dir.path(), "big", 1, true)
        .expect("phantom written");
    let image = dir.path().join("big.nii.gz");
    let cfg = PreprocessConfig::new(256);

    let mut group = c.benchmark_group("ct_512x512x300");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));

    group.bench_function("read_nii_gz", |b| {
        b.iter(|| read_volume(&image).expect("readable"))
    });
    let volume = read_volume(&image).expect("readable");
    group.bench_function("preprocess_p256", |b| {
        b.iter(|| {
            let ct = CanonicalCt::from_volume(&volume);
            volume_patches(&ct, &cfg)
        })
    });
    let ct = CanonicalCt::from_volume(&volume);
    let vp = volume_patches(&ct, &cfg);
    let predicted = label_patches(&phantom.lobes, ct.dims, &vp.slices, cfg.patch);
    let out = dir.path().join("big_lobes.nii.gz");
    group.bench_function("write_back", |b| {
        b.iter(|| {
            let mut lobes = paste_patches(&predicted, &vp.slices, ct.dims, cfg.patch);
            keep_largest_components(&mut lobes, ct.dims);
            let native = volume.orientation.from_canonical(&lobes);
            write_label_map(&out, &volume, &native, true).expect("written");
        })
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
