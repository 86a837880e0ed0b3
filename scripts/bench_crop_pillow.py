"""Crop 4000x3000 -> model input: deepeyes-tools (fast_image_resize) next to Pillow, same run.

Runs the `crop_timing` example of deepeyes-tools (release build), which times
`crop_to_model_input` (crop + Qwen2.5-VL smart resize, bicubic/Catmull-Rom) on a fixed set of
crops and dumps its outputs; then rebuilds the same synthetic image here and times Pillow's
`Image.resize(size, BICUBIC, box=crop)` (crop and resize in one call, Pillow's fastest path) on
the same crops to the same sizes (Pillow on one thread; the Rust side on `--threads`, default
every core, as the tool runs). Prints both medians, the
ratio, and how far the two outputs differ.

Usage (from the repository root, with Pillow and numpy, e.g. scripts/requirements.txt):
    python scripts/bench_crop_pillow.py [--reps 15] [--bin PATH_TO_crop_timing]
Without --bin the example is built and run with `cargo run --release`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def bench_image(width: int, height: int) -> Image.Image:
    """The image of deepeyes-tools/benches/common/mod.rs: ((7x + 13y + 85c) ^ (xy >> 4)) & 255."""
    y, x = np.mgrid[0:height, 0:width].astype(np.uint64)
    channels = [((x * 7 + y * 13 + c * 85) ^ ((x * y) >> 4)) & 255 for c in range(3)]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8), "RGB")


def run_rust(reps: int, dump: Path, binary: str | None, threads: int | None) -> dict:
    if binary:
        cmd = [binary]
    else:
        cmd = [os.environ.get("CARGO", "cargo"), "run", "--quiet", "--release",
               "-p", "deepeyes-tools", "--example", "crop_timing", "--"]
    cmd += ["--reps", str(reps), "--dump", str(dump)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--bin", help="a built crop_timing example binary")
    parser.add_argument("--threads", type=int,
                        help="resize threads on the Rust side (default: every core, as the tool "
                             "runs; Pillow always uses one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp)
        rust = run_rust(args.reps, dump, args.bin, args.threads)
        width, height = rust["image"]
        img = bench_image(width, height)
        img.load()
        rows = []
        for i, r in enumerate(rust["results"]):
            box = (r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"])
            size = (r["out_width"], r["out_height"])
            out = img.resize(size, Image.BICUBIC, box=box)  # warm-up
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                timed = img.resize(size, Image.BICUBIC, box=box)
                times.append((time.perf_counter() - start) * 1e3)
                del timed
            pil_ms = statistics.median(times)
            pil_min = min(times)
            ours = np.frombuffer((dump / f"crop_{i}.rgb").read_bytes(), dtype=np.uint8)
            diff = np.abs(ours.astype(np.int16) - np.asarray(out, dtype=np.int16).reshape(-1))
            rows.append((r, pil_ms, pil_min, float(diff.mean()), int(diff.max())))

    print(f"crop {width}x{height} -> model input (smart resize, bicubic); {args.reps} runs each, "
          f"ours on {rust['threads']} thread(s), Pillow on one; Pillow {PIL.__version__}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print("median: middle run; best: fastest run (less sensitive to other processes)")
    header = (f"{'crop (w×h @ x,y)':<22}{'model input':>12}{'ours med':>10}{'PIL med':>9}{'ratio':>7}"
              f"{'ours best':>11}{'PIL best':>10}{'ratio':>7}{'mean|Δ|':>9}{'max|Δ|':>7}")
    print(header)
    print("-" * len(header))
    sums = [0.0, 0.0, 0.0, 0.0]
    for r, pil_ms, pil_min, mean_d, max_d in rows:
        crop = f"{r['width']}×{r['height']} @ {r['x']},{r['y']}"
        model = f"{r['out_width']}×{r['out_height']}"
        ours, ours_min = r["median_ms"], r["min_ms"]
        for k, v in enumerate((ours, pil_ms, ours_min, pil_min)):
            sums[k] += v
        print(f"{crop:<22}{model:>12}{ours:>10.2f}{pil_ms:>9.2f}{pil_ms / ours:>6.1f}×"
              f"{ours_min:>11.2f}{pil_min:>10.2f}{pil_min / ours_min:>6.1f}×{mean_d:>9.3f}{max_d:>7}")
    print("-" * len(header))
    print(f"{'all crops (sum)':<22}{'':>12}{sums[0]:>10.2f}{sums[1]:>9.2f}{sums[1] / sums[0]:>6.1f}×"
          f"{sums[2]:>11.2f}{sums[3]:>10.2f}{sums[3] / sums[2]:>6.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
