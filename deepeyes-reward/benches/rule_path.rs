//! Throughput of rule-path scoring: the shipped DeepEyes pipeline without a judge, over a mix of
//! visual and math responses of realistic length.

// criterion's macros generate undocumented public items.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deepeyes_core::reward::{RewardFn, RewardInput};
use deepeyes_reward::{PipelineConfig, Registry};

const CROP: &str = "\n<|im_start|>user\n<tool_response><|vision_start|><|image_pad|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>Think, then answer.</tool_response><|im_end|>\n<|im_start|>assistant\n";

fn samples() -> Vec<(&'static str, &'static str, &'static str, String)> {
    let reasoning =
        "The object is small, so I look at the upper-left region more closely. ".repeat(6);
    let mc = "Where is the cup?\nA. left of the plate\nB. right of the plate\nC. on the plate\nD. under the table";
    vec![
        (
            "vstar",
            "What colour is the umbrella?",
            "red",
            format!(
                "<think>{reasoning}</think><tool_call>{{\"name\": \"image_zoom_in_tool\", \"arguments\": {{\"bbox_2d\": [10, 20, 300, 400]}}}}</tool_call><|im_end|>{CROP}<think>{reasoning}</think><answer>Red.</answer>"
            ),
        ),
        (
            "vstar",
            "Is the door open?",
            "no",
            format!("<think>{reasoning}</think><answer>No, it is closed.</answer>"),
        ),
        (
            "chart",
            mc,
            "B",
            format!(
                "<think>{reasoning}</think>{CROP}<think>ok</think><answer>(B) right of the plate</answer>"
            ),
        ),
        (
            "chart",
            "What is the peak value?",
            "12.5",
            format!("<think>{reasoning}</think><answer>about 12.50</answer>"),
        ),
        (
            "chart",
            mc,
            "C",
            format!("<think>{reasoning}</think><answer>on the plate</answer>"),
        ),
        (
            "thinklite_eureka",
            "Compute 3/6.",
            "1/2",
            format!(r"<think>{reasoning}</think>So the result is \boxed{{\dfrac{{1}}{{2}}}}."),
        ),
        (
            "thinklite_eureka",
            "Angle?",
            "30",
            format!(r"<think>{reasoning}</think>\boxed{{30^\circ}}"),
        ),
        (
            "thinklite_eureka",
            "Point?",
            "(1,2)",
            format!(r"<think>{reasoning}</think>\boxed{{\left( 1 , 2 \right)}}"),
        ),
        (
            "thinklite_eureka",
            "Compute.",
            "7",
            format!(r"<think>{reasoning}</think>\boxed{{2\sqrt{{4}} + 3}}"),
        ),
        (
            "thinklite_eureka",
            "Compute.",
            "7",
            format!("<think>{reasoning}</think>no box"),
        ),
    ]
}

fn rule_path(c: &mut Criterion) {
    let mut config = PipelineConfig::deepeyes().expect("shipped config");
    config.judge = None;
    let pipeline = config.build(&Registry::new()).expect("pipeline");
    let samples = samples();
    let mut group = c.benchmark_group("rule_path");
    group.throughput(Throughput::Elements(samples.len() as u64));
    group.bench_function("deepeyes_pipeline_mixed_10", |b| {
        b.iter(|| {
            for (source, question, truth, response) in &samples {
                let input = RewardInput {
                    data_source: source,
                    question,
                    ground_truth: truth,
                    response,
                    trajectory: None,
                };
                black_box(pipeline.score(black_box(&input)).expect("score"));
            }
        });
    });
    group.finish();
}

criterion_group!(benches, rule_path);
criterion_main!(benches);
