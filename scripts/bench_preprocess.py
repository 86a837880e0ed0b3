#!/usr/bin/env python3
"""Side-by-side benchmark: deepeyes' Rust preprocessing vs transformers' Qwen2.5-VL processor.

Writes synthetic test images (the same `pattern()` as the golden fixtures) as PNG files, times
transformers' default processor on them in this process, runs the Rust example
`deepeyes-core/examples/bench_preprocess.rs` (release build) on the same files, checks that both
give the same grid and how far apart the pixel values are, and prints the timings and speed-ups.
Decoding is excluded on both sides: each side decodes the PNG once before timing.

Usage (from the repository root):

    python scripts/bench_preprocess.py [--iters 10] [--threads N] [--json results.json]

`--threads` sets torch's intra-op threads (default: torch's own default, every core); the Rust
pipeline resizes on one thread and patchifies large images on up to every core. Both wall-clock
medians and CPU time per call (all threads) are reported: on a shared, busy machine the
wall-clock time of a long call also counts the time other processes held the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_preprocess_golden import QWEN25VL_PREPROCESSOR, make_processor, pattern  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
IMAGES = [
    ("vga_480x640", 480, 640, "mixed"),
    ("square_1024", 1024, 1024, "mixed"),
    ("hd_1080x1920", 1080, 1920, "smooth"),
    ("photo_3000x4000", 3000, 4000, "mixed"),
    ("hrbench8k_4320x7680", 4320, 7680, "mixed"),
    ("thin_100x2000", 100, 2000, "mixed"),
    ("tiny_20x30", 20, 30, "mixed"),
]


def time_transformers(proc, image: Image.Image, iters: int, min_time_s: float):
    """Wall-clock times (ms) of each call, CPU ms per call (all threads), and one output."""
    out = proc(images=[image], return_tensors="pt")  # warm-up, and the result to compare
    times = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_time_s:
        t = time.perf_counter()
        proc(images=[image], return_tensors="pt")
        times.append((time.perf_counter() - t) * 1e3)
    cpu_ms = (time.process_time() - cpu0) * 1e3 / len(times)
    return times, cpu_ms, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=10, help="timed runs per image and side (at least)")
    ap.add_argument("--min-time", type=float, default=1.0, help="minimum seconds per image and side")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--cargo-target-dir", default=os.environ.get("CARGO_TARGET_DIR"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    env = dict(os.environ)
    if args.cargo_target_dir:
        env["CARGO_TARGET_DIR"] = args.cargo_target_dir
    cargo = ["cargo", "build", "--release", "-p", "deepeyes-core", "--no-default-features",
             "--example", "bench_preprocess", "--message-format=json"]
    print("building the Rust example (release)...", flush=True)
    build = subprocess.run(cargo, cwd=REPO, env=env, capture_output=True, text=True)
    if build.returncode != 0:
        sys.exit(f"cargo build failed:\n{build.stderr}")
    exe = None
    for line in build.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "bench_preprocess":
            exe = msg.get("executable") or exe
    if exe is None:
        sys.exit("cargo did not report the bench_preprocess executable")

    load_before = os.getloadavg()
    proc = make_processor(QWEN25VL_PREPROCESSOR["min_pixels"], QWEN25VL_PREPROCESSOR["max_pixels"])
    std = np.asarray(QWEN25VL_PREPROCESSOR["image_std"], dtype=np.float64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dump = tmp / "rust"
        dump.mkdir()
        paths = []
        for name, h, w, kind in IMAGES:
            path = tmp / f"{name}.png"
            Image.fromarray(pattern(h, w, kind, 7)).save(path, compress_level=1)
            paths.append(path)

        print(f"timing transformers {transformers.__version__} ({type(proc).__name__}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads)...", flush=True)
        py = {}
        for path in paths:
            image = Image.open(path)
            image.load()
            py[path.stem] = time_transformers(proc, image, args.iters, args.min_time)

        print("timing deepeyes (Rust)...", flush=True)
        run = subprocess.run(
            [exe, "--iters", str(args.iters), "--min-time-ms", str(args.min_time * 1e3),
             "--dump", str(dump), *map(str, paths)],
            capture_output=True, text=True,
        )
        if run.returncode != 0:
            sys.exit(f"bench_preprocess failed:\n{run.stderr}")
        rust = {Path(r["image"]).stem: r for r in map(json.loads, run.stdout.splitlines())}

        for name, h, w, _ in IMAGES:
            times, cpu_py, out = py[name]
            r = rust[name]
            ref = out["pixel_values"].numpy()
            grid = [int(v) for v in out["image_grid_thw"][0]]
            ours = np.load(dump / f"{name}.npy")
            same_grid = grid == r["grid_thw"] and ours.shape == ref.shape
            if same_grid:
                d = np.abs(ours.reshape(len(ours), 3, -1) - ref.reshape(len(ref), 3, -1)) * (std[None, :, None] * 255)
                mean_lv, max_lv = float(d.mean()), float(d.max())
            else:
                mean_lv = max_lv = float("nan")
            t_py = statistics.median(times)
            rows.append({
                "image": name, "height": h, "width": w, "grid_thw": grid, "same_grid": same_grid,
                "transformers_median_ms": round(t_py, 3), "transformers_runs": len(times),
                "rust_median_ms": r["median_ms"], "rust_runs": r["runs"],
                "rust_reused_median_ms": r["reused_buffer_median_ms"],
                "rust_reused_cpu_ms": r["reused_buffer_cpu_ms"],
                "speedup": round(t_py / r["median_ms"], 2),
                "transformers_cpu_ms": round(cpu_py, 3), "rust_cpu_ms": r["cpu_ms"],
                "cpu_speedup": round(cpu_py / r["cpu_ms"], 2) if r["cpu_ms"] else None,
                "mean_abs_levels": round(mean_lv, 5), "max_abs_levels": round(max_lv, 3),
            })

    print()
    print(f"load average before/after: {load_before} / {os.getloadavg()}")
    print("wall = median wall-clock ms per call; cpu = CPU ms per call, all threads;")
    print("rust = preprocess_image (fresh buffers, like transformers); reused = one Preprocessor and")
    print("one output buffer kept across calls (how a model backend runs it).")
    header = (f"{'image':<20} {'grid':<9} {'HF wall':>8} {'rust':>7} {'ratio':>6} {'reused':>7} {'ratio':>6}"
              f" | {'HF cpu':>7} {'rust':>7}"
              f" {'ratio':>6} {'reused':>7} {'ratio':>6} | {'mean|Δ|':>7} {'max':>3}")
    print(header)
    print("-" * len(header))

    def ratio(a, b):
        return f"{a / b:>5.1f}x" if b else "     -"

    for r in rows:
        g = "x".join(map(str, r["grid_thw"][1:])) + ("" if r["same_grid"] else "(!)")
        print(f"{r['image']:<20} {g:<9} {r['transformers_median_ms']:>8.2f} {r['rust_median_ms']:>7.2f}"
              f" {ratio(r['transformers_median_ms'], r['rust_median_ms'])}"
              f" {r['rust_reused_median_ms']:>7.2f} {ratio(r['transformers_median_ms'], r['rust_reused_median_ms'])}"
              f" | {r['transformers_cpu_ms']:>7.2f}"
              f" {r['rust_cpu_ms'] or 0:>7.2f} {ratio(r['transformers_cpu_ms'], r['rust_cpu_ms'])}"
              f" {r['rust_reused_cpu_ms'] or 0:>7.2f} {ratio(r['transformers_cpu_ms'], r['rust_reused_cpu_ms'])}"
              f" | {r['mean_abs_levels']:>7.4f} {r['max_abs_levels']:>3.0f}")
    total_py = sum(r["transformers_median_ms"] for r in rows)
    total_rs = sum(r["rust_median_ms"] for r in rows)
    cpu_py = sum(r["transformers_cpu_ms"] for r in rows)
    cpu_rs = sum(r["rust_cpu_ms"] or 0 for r in rows)
    cpu_re = sum(r["rust_reused_cpu_ms"] or 0 for r in rows)
    total_re = sum(r["rust_reused_median_ms"] for r in rows)
    print(f"{'all images':<20} {'':<9} {total_py:>8.2f} {total_rs:>7.2f} {ratio(total_py, total_rs)}"
          f" {total_re:>7.2f} {ratio(total_py, total_re)} |"
          f" {cpu_py:>7.2f} {cpu_rs:>7.2f} {ratio(cpu_py, cpu_rs)} {cpu_re:>7.2f} {ratio(cpu_py, cpu_re)} |")
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "processor": type(proc).__name__,
        "rows": rows,
        "load_average_before": load_before,
        "total_speedup": round(total_py / total_rs, 2),
        "total_speedup_reused": round(total_py / total_re, 2),
        "total_cpu_speedup": round(cpu_py / cpu_rs, 2) if cpu_rs else None,
        "total_cpu_speedup_reused": round(cpu_py / cpu_re, 2) if cpu_re else None,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not all(r["same_grid"] for r in rows):
        sys.exit("grid mismatch")


if __name__ == "__main__":
    main()
