//! The Rust port of Qwen2.5-VL's data-dependent helpers against values dumped from transformers
//! (`tests/data/tiny-qwen2_5_vl/golden/vision_reference.json` and `golden.safetensors`).

mod tiny_fixture;

use deepeyes_core::vision::{
    VisionGeometry, frame_seqlens, reverse_index, rope_index, vision_inputs, vision_position_ids,
    window_index,
};
use proptest::prelude::*;
use serde_json::Value;

fn reference() -> Value {
    let path = tiny_fixture::root().join("golden/vision_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON")
}

fn geometry(r: &Value) -> VisionGeometry {
    VisionGeometry {
        patch_size: r["patch-size"].as_u64().unwrap() as u32,
        spatial_merge_size: r["spatial-merge-size"].as_u64().unwrap() as u32,
        window_size: r["window-size"].as_u64().unwrap() as u32,
    }
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn grids(v: &Value) -> Vec<[u32; 3]> {
    // Either one grid `[t, h, w]` or a list of grids.
    let arr = v.as_array().unwrap();
    if arr[0].is_number() {
        vec![[
            arr[0].as_u64().unwrap() as u32,
            arr[1].as_u64().unwrap() as u32,
            arr[2].as_u64().unwrap() as u32,
        ]]
    } else {
        arr.iter().flat_map(grids).collect()
    }
}

#[test]
fn vision_helpers_match_transformers() {
    let r = reference();
    let geo = geometry(&r);
    let cases = r["vision"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let g = grids(&case["grid_thw"]);
        let pos: Vec<i64> = vision_position_ids(&g, &geo)
            .unwrap()
            .into_iter()
            .flatten()
            .collect();
        let want: Vec<i64> = case["pos_ids"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(ints)
            .collect();
        assert_eq!(pos, want, "pos ids of {g:?}");
        let w = window_index(&g, &geo).unwrap();
        assert_eq!(
            w.window_index,
            ints(&case["window_index"]),
            "window index of {g:?}"
        );
        assert_eq!(
            w.cu_window_seqlens,
            ints(&case["cu_window_seqlens"]),
            "window bounds of {g:?}"
        );
        assert_eq!(
            frame_seqlens(&g),
            ints(&case["cu_seqlens"]),
            "frame bounds of {g:?}"
        );
    }
}

#[test]
fn rope_index_matches_transformers() {
    let r = reference();
    let geo = geometry(&r);
    let pad = r["image-pad"].as_u64().unwrap() as u32;
    for case in r["rope"].as_array().unwrap() {
        let ids: Vec<u32> = ints(&case["input_ids"])
            .into_iter()
            .map(|v| v as u32)
            .collect();
        let g = grids(&case["grid_thw"]);
        let got = rope_index(&ids, pad, &g, &geo).unwrap();
        let want = case["position_ids"].as_array().unwrap();
        for (axis, want_axis) in want.iter().enumerate().take(3) {
            assert_eq!(got.positions[axis], ints(want_axis), "axis {axis} of {g:?}");
        }
        assert_eq!(
            got.delta,
            case["rope_delta"].as_i64().unwrap(),
            "delta of {g:?}"
        );
    }
}

#[test]
fn golden_prompt_helpers_match_transformers() {
    let golden = tiny_fixture::Golden::load();
    let r = reference();
    let geo = geometry(&r);
    let g = golden.grids();
    let pos: Vec<i64> = vision_position_ids(&g, &geo)
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(pos, golden.i64("vision_pos_ids").data);
    let w = window_index(&g, &geo).unwrap();
    assert_eq!(w.window_index, golden.i64("window_index").data);
    assert_eq!(w.cu_window_seqlens, golden.i64("cu_window_seqlens").data);
    assert_eq!(frame_seqlens(&g), golden.i64("cu_seqlens").data);
    // The two images give several windows each, some partial: the masks are non-trivial.
    assert!(w.cu_window_seqlens.len() > 4);

    let ids = golden.u32s("input_ids");
    let rope = rope_index(&ids, r["image-pad"].as_u64().unwrap() as u32, &g, &geo).unwrap();
    let want = golden.i64("position_ids");
    let n = ids.len();
    for axis in 0..3 {
        assert_eq!(
            rope.positions[axis],
            want.data[axis * n..(axis + 1) * n],
            "axis {axis}"
        );
    }
    assert_eq!(rope.delta, golden.i64("rope_delta").data[0]);
}

fn grid_strategy() -> impl Strategy<Value = [u32; 3]> {
    (1u32..=2, 1u32..=12, 1u32..=12).prop_map(|(t, h, w)| [t, 2 * h, 2 * w])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn window_geometry_invariants(gs in proptest::collection::vec(grid_strategy(), 1..4)) {
        let geo = VisionGeometry::default();
        let w = window_index(&gs, &geo).unwrap();
        let merged: usize = gs.iter().map(|&g| geo.merged_tokens(g)).sum();
        // A permutation of the merged tokens that keeps each image's tokens together.
        let mut sorted = w.window_index.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (0..merged as i64).collect::<Vec<_>>());
        let rev = reverse_index(&w.window_index).unwrap();
        for (k, &i) in w.window_index.iter().enumerate() {
            prop_assert_eq!(rev[i as usize], k as i64);
        }
        // Windows tile the patches, none larger than a full window, and never cross an image.
        prop_assert_eq!(*w.cu_window_seqlens.last().unwrap(), 4 * merged as i64);
        let full = (geo.window_tokens() * geo.window_tokens() * 4) as i64;
        prop_assert!(w.cu_window_seqlens.windows(2).all(|p| p[1] > p[0] && p[1] - p[0] <= full));
        let frames = frame_seqlens(&gs);
        for b in &frames {
            prop_assert!(w.cu_window_seqlens.contains(b), "frame boundary {} splits a window", b);
        }
        // The masks are symmetric and every row attends at least to itself.
        let vi = vision_inputs(&gs, &geo).unwrap();
        let n = vi.patches;
        for i in 0..n {
            prop_assert_eq!(vi.window_mask[i * n + i], 0.0);
            prop_assert_eq!(vi.full_mask[i * n + i], 0.0);
        }
        let probe = n / 2;
        for j in 0..n {
            prop_assert_eq!(vi.window_mask[probe * n + j], vi.window_mask[j * n + probe]);
        }
    }

    #[test]
    fn rope_positions_advance(text in proptest::collection::vec(0u32..50, 0..6), g in grid_strategy()) {
        // Still images have one frame (videos may reuse positions, as in transformers).
        let g = [1, g[1], g[2]];
        let geo = VisionGeometry::default();
        let pad = 99;
        let mut ids = text.clone();
        ids.extend(std::iter::repeat_n(pad, geo.merged_tokens(g)));
        ids.push(7);
        let r = rope_index(&ids, pad, &[g], &geo).unwrap();
        let last = ids.len() - 1;
        // The text after the image continues from the image's largest position plus one.
        let max_before = (0..3).map(|a| r.positions[a][..last].iter().copied().max().unwrap()).max().unwrap();
        prop_assert_eq!(r.positions[0][last], max_before + 1);
        prop_assert_eq!(r.next_position(ids.len()), r.positions[0][last] + 1);
    }
}
