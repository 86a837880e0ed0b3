#!/usr/bin/env python3
"""Prefill and decode speed of the tiny Qwen2.5-VL: deepeyes' Rust ONNX Runtime backend vs
PyTorch eager (transformers) on the same weights and the same two-image prompt, side by side.

    .venv/bin/python scripts/bench_tiny_backend.py [--threads 1] [--reps 20] [--decode 64]

Rust side: `cargo run --release -p deepeyes-core --example onnx_speed` (built by this script; it
needs the ONNX Runtime library, see scripts/setup_ort.sh). Python side: the HF checkpoint in
tests/data/tiny-qwen2_5_vl/hf. Both measure
  - prefill: vision encoder for both images + embedding + decoder over the 265-token prompt,
    logits of the last position only (median of --reps runs after 2 warm-ups);
  - decode: --decode greedy steps with the KV cache after the prompt (median run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests/data/tiny-qwen2_5_vl"


def bench_rust(threads: int, reps: int, decode: int, binary: str | None) -> dict:
    run = [binary] if binary else [
        "cargo", "run", "--quiet", "--release", "-p", "deepeyes-core", "--example", "onnx_speed", "--",
    ]
    cmd = run + [str(FIXTURE), "--threads", str(threads), "--reps", str(reps), "--decode", str(decode)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_torch(threads: int, reps: int, decode: int) -> dict:
    import torch
    from safetensors.numpy import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(threads)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        FIXTURE / "hf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    g = load_file(str(FIXTURE / "golden/golden.safetensors"))
    input_ids = torch.from_numpy(g["input_ids"]).view(1, -1)
    pixel_values = torch.from_numpy(g["pixel_values"])
    grid = torch.from_numpy(g["image_grid_thw"])
    mm = (input_ids == model.config.image_token_id).to(torch.int32)

    def prefill():
        model.model.rope_deltas = None
        return model(
            input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid,
            mm_token_type_ids=mm, use_cache=True, logits_to_keep=1,
        )

    times = []
    with torch.inference_mode():
        for rep in range(reps + 2):
            t = time.perf_counter()
            prefill()
            dt = time.perf_counter() - t
            if rep >= 2:
                times.append(dt)
        steps = []
        for rep in range((reps + 3) // 4 + 1):
            out = prefill()
            cache, token = out.cache, out.logits[0, -1].argmax()
            t = time.perf_counter()
            for _ in range(decode):
                nxt = token.view(1, 1)
                out = model(input_ids=nxt, cache=cache, use_cache=True, mm_token_type_ids=torch.zeros_like(nxt))
                cache, token = out.cache, out.logits[0, -1].argmax()
            if rep >= 1:
                steps.append(time.perf_counter() - t)
    p = statistics.median(times)
    d = statistics.median(steps)
    s = input_ids.shape[1]
    return {
        "backend": "pytorch-eager",
        "threads": threads,
        "prompt_tokens": s,
        "prefill_ms": p * 1e3,
        "prefill_tokens_per_s": s / p,
        "decode_tokens": decode,
        "decode_ms_per_token": d * 1e3 / decode,
        "decode_tokens_per_s": decode / d,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    ap.add_argument("--rust-bin", help="a prebuilt onnx_speed example binary (default: cargo run --release)")
    args = ap.parse_args()

    rust = bench_rust(args.threads, args.reps, args.decode, args.rust_bin)
    torch_ = bench_torch(args.threads, args.reps, args.decode)
    print(f"tiny Qwen2.5-VL, {rust['prompt_tokens']}-token two-image prompt, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs visible")
    print(f"{'':24}{'Rust ort':>14}{'PyTorch eager':>16}{'ratio':>9}")
    for key, label in [("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s")]:
        r, t = rust[key], torch_[key]
        print(f"{label:24}{r:14.0f}{t:16.0f}{r / t:8.1f}×")
    for key, label in [("prefill_ms", "prefill ms"), ("decode_ms_per_token", "decode ms/token")]:
        r, t = rust[key], torch_[key]
        print(f"{label:24}{r:14.3f}{t:16.3f}{t / r:8.1f}×")
    if args.json:
        print(json.dumps({"rust": rust, "torch": torch_}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
