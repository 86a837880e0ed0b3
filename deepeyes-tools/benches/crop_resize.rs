//! Criterion bench: crop a 4000×3000 image and bring the crop to model input size (smart resize,
//! bicubic), the path every zoom-in observation takes before the vision encoder.
//!
//! `scripts/bench_crop_pillow.py` times Pillow on the same crops (through the `crop_timing`
//! example) and prints the ratio.

use criterion::Criterion;
use deepeyes_core::PreprocessConfig;
use deepeyes_tools::resize::{Filter, crop_to_model_input};
mod common;

use common::{BENCH_CROPS, bench_image};

fn crop_to_model(c: &mut Criterion) {
    let image = bench_image(4000, 3000);
    let pre = PreprocessConfig::default();
    let mut group = c.benchmark_group("crop_4000x3000_to_model_input");
    for &rect in BENCH_CROPS {
        let id = format!("{}x{}@{},{}", rect.width, rect.height, rect.x, rect.y);
        group.bench_function(id, |b| {
            b.iter(|| {
                crop_to_model_input(
                    std::hint::black_box(&image),
                    Some(rect),
                    &pre,
                    Filter::CatmullRom,
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().sample_size(20).configure_from_args();
    crop_to_model(&mut c);
    c.final_summary();
}
