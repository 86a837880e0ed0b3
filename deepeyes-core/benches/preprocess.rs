//! Criterion benchmarks of the Qwen2.5-VL pixel pipeline (`preprocess_image`) and of its two
//! stages (resize; normalise + patchify) on synthetic images of typical sizes.

#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use deepeyes_core::PreprocessConfig;
use deepeyes_core::preprocess::{
    PatternKind, normalize_patchify, preprocess_image, resize_rgb, test_pattern,
};

const SIZES: &[(&str, u32, u32)] = &[
    ("480x640", 480, 640),
    ("1024x1024", 1024, 1024),
    ("1080x1920", 1080, 1920),
    ("4320x7680", 4320, 7680),
];

fn bench_preprocess(c: &mut Criterion) {
    let cfg = PreprocessConfig::default();
    let mut group = c.benchmark_group("preprocess_image");
    group.sample_size(10);
    for &(name, h, w) in SIZES {
        let image = test_pattern(h, w, PatternKind::Mixed, 1).expect("pattern");
        group.throughput(Throughput::Elements(u64::from(h) * u64::from(w)));
        group.bench_with_input(BenchmarkId::from_parameter(name), &image, |b, image| {
            b.iter(|| preprocess_image(image, &cfg).expect("preprocess"));
        });
    }
    group.finish();

    let mut stages = c.benchmark_group("stages_1080x1920");
    stages.sample_size(10);
    let image = test_pattern(1080, 1920, PatternKind::Mixed, 1).expect("pattern");
    let (h, w) = cfg.smart_resize(1080, 1920).expect("size");
    stages.bench_function("resize_bicubic", |b| {
        b.iter(|| resize_rgb(&image, h, w, cfg.resample).expect("resize"));
    });
    let resized = resize_rgb(&image, h, w, cfg.resample).expect("resize");
    stages.bench_function("normalize_patchify", |b| {
        b.iter(|| normalize_patchify(&resized, &cfg).expect("patchify"));
    });
    stages.finish();
}

criterion_group!(benches, bench_preprocess);
criterion_main!(benches);
