#!/usr/bin/env python3
"""Golden fixtures for deepeyes' Qwen2.5-VL image preprocessing (deepeyes-core `preprocess`).

Runs transformers' own image processor on deterministic synthetic images and writes what the
Rust test `deepeyes-core/tests/preprocess_golden.rs` compares against:

- `cases.json`: for every case, the source size, pattern and pixel limits, the processor's
  resized size, grid and token count, the per-channel mean of its pixel values, and how far the
  other transformers backend (PIL) is from it;
- `samples.npy`: uint32 rows `[case, flat pixel index, 0xRRGGBB]` of the processor's resized
  8-bit image at up to 2048 seeded positions per case (all positions for small images);
- `pv_<case>.npy` (float32 `[N, 1176]`) and `resized_<case>.png` for a few small cases: the
  complete pixel values, and the resized image they were computed from;
- `cli_sample.png`: the image the `deepeyes preprocess` snapshot test reads.

The source images are never stored: `pattern()` below and `deepeyes_core::preprocess::test_pattern`
compute the same pixels from `(height, width, kind, seed)` with integer arithmetic.

Usage (from the repository root, with scripts/requirements.txt installed):

    python scripts/gen_preprocess_golden.py [--out tests/data/preprocess]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
import transformers
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as qwen2_vl_smart_resize

# Qwen2.5-VL-7B-Instruct's preprocessor_config.json (DeepEyes-7B ships the same values).
QWEN25VL_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
}
DEFAULT_MIN, DEFAULT_MAX = 3136, 12845056
SAMPLES_PER_CASE = 2048

# (name, height, width, pattern kind, seed, min_pixels, max_pixels, keep full pixel values)
CASES = [
    ("tiny_1x1", 1, 1, "mixed", 1, DEFAULT_MIN, DEFAULT_MAX, False),
    ("tiny_3x5", 3, 5, "mixed", 2, DEFAULT_MIN, DEFAULT_MAX, True),
    ("small_10x10", 10, 10, "mixed", 3, DEFAULT_MIN, DEFAULT_MAX, False),
    ("odd_13x17", 13, 17, "mixed", 4, DEFAULT_MIN, DEFAULT_MAX, False),
    ("factor_28x28", 28, 28, "mixed", 5, DEFAULT_MIN, DEFAULT_MAX, False),
    ("odd_27x29", 27, 29, "smooth", 6, DEFAULT_MIN, DEFAULT_MAX, False),
    ("below_min_40x60", 40, 60, "mixed", 7, DEFAULT_MIN, DEFAULT_MAX, False),
    ("exact_56x84", 56, 84, "mixed", 8, DEFAULT_MIN, DEFAULT_MAX, True),
    ("odd_50x90", 50, 90, "mixed", 9, DEFAULT_MIN, DEFAULT_MAX, True),
    ("odd_333x517", 333, 517, "mixed", 10, DEFAULT_MIN, DEFAULT_MAX, False),
    ("vga_480x640", 480, 640, "mixed", 11, DEFAULT_MIN, DEFAULT_MAX, False),
    ("smooth_768x1024", 768, 1024, "smooth", 12, DEFAULT_MIN, DEFAULT_MAX, False),
    ("odd_719x1283", 719, 1283, "mixed", 13, DEFAULT_MIN, DEFAULT_MAX, False),
    ("square_1024", 1024, 1024, "mixed", 14, DEFAULT_MIN, DEFAULT_MAX, False),
    ("hd_1080x1920", 1080, 1920, "smooth", 15, DEFAULT_MIN, DEFAULT_MAX, False),
    ("portrait_2048x1536", 2048, 1536, "mixed", 16, DEFAULT_MIN, DEFAULT_MAX, False),
    ("photo_3000x4000", 3000, 4000, "mixed", 17, DEFAULT_MIN, DEFAULT_MAX, False),
    ("above_max_8k_4320x7680", 4320, 7680, "mixed", 18, DEFAULT_MIN, DEFAULT_MAX, False),
    ("wide_100x2000", 100, 2000, "mixed", 19, DEFAULT_MIN, DEFAULT_MAX, False),
    ("thin_10x1999", 10, 1999, "mixed", 20, DEFAULT_MIN, DEFAULT_MAX, False),
    ("tall_2000x12", 2000, 12, "mixed", 21, DEFAULT_MIN, DEFAULT_MAX, False),
    ("aspect_200_28x5600", 28, 5600, "smooth", 22, DEFAULT_MIN, DEFAULT_MAX, False),
    ("custom_max_768x1024", 768, 1024, "mixed", 23, DEFAULT_MIN, 256 * 28 * 28, False),
    ("custom_min_100x150", 100, 150, "mixed", 24, 256 * 28 * 28, DEFAULT_MAX, False),
    ("custom_both_1500x900", 1500, 900, "smooth", 25, 128 * 28 * 28, 1024 * 28 * 28, False),
    # Refused by the processor (aspect ratio above 200).
    ("reject_1x201", 1, 201, "mixed", 26, DEFAULT_MIN, DEFAULT_MAX, False),
    ("reject_300x1", 300, 1, "mixed", 27, DEFAULT_MIN, DEFAULT_MAX, False),
]

CLI_SAMPLE = (120, 200, "smooth", 0)


def _hash32(x, y, c, seed: int):
    """numpy twin of `hash32` in deepeyes-core/src/preprocess/pattern.rs (wrapping u32)."""
    u = np.uint32
    with np.errstate(over="ignore"):
        return _mix32(x, y, c, seed)


def _mix32(x, y, c, seed: int):
    u = np.uint32
    h = (x * u(0x9E3779B1)) ^ (y * u(0x85EBCA77)) ^ (c * u(0xC2B2AE3D)) ^ u((seed * 0x27D4EB2F) & 0xFFFFFFFF)
    h ^= h >> u(15)
    h *= u(0x2C1B3C6D)
    h ^= h >> u(12)
    h *= u(0x297A2D39)
    h ^= h >> u(15)
    return h


def pattern(height: int, width: int, kind: str, seed: int) -> np.ndarray:
    """The `height × width × 3` uint8 image `test_pattern(height, width, kind, seed)` builds."""
    out = np.empty((height, width, 3), dtype=np.uint8)
    xs = np.arange(width, dtype=np.uint32)[None, :, None]
    cs = np.arange(3, dtype=np.uint32)[None, None, :]
    gx = xs.astype(np.uint64) * 255 // max(width - 1, 1)
    rows = max(1, (1 << 22) // max(width, 1))
    for y0 in range(0, height, rows):
        ys = np.arange(y0, min(height, y0 + rows), dtype=np.uint32)[:, None, None]
        gy = ys.astype(np.uint64) * 255 // max(height - 1, 1)
        base = np.where(cs == 0, gx, np.where(cs == 1, gy, (gx + gy) // 2)).astype(np.int64)
        if kind == "mixed":
            checker = (((xs // 9) + (ys // 7)) % 2).astype(np.int64) * 64
            noise = (_hash32(xs, ys, cs, seed) % np.uint32(32)).astype(np.int64)
            v = np.minimum(base * 3 // 4 + checker + noise, 255)
        elif kind == "smooth":
            dx = 2 * xs.astype(np.int64) + 1 - width
            dy = 2 * ys.astype(np.int64) + 1 - height
            short = min(height, width)
            inside = 9 * (dx * dx + dy * dy) < 4 * short * short
            v = np.where(inside, 255 - base, base)
        else:
            raise ValueError(f"unknown pattern kind {kind!r}")
        out[y0 : y0 + ys.shape[0]] = np.broadcast_to(v, (ys.shape[0], width, 3)).astype(np.uint8)
    return out


def make_processor(min_pixels: int, max_pixels: int, backend: str | None = None):
    """The processor `AutoImageProcessor` builds for a Qwen2.5-VL checkpoint directory."""
    with tempfile.TemporaryDirectory() as d:
        cfg = dict(QWEN25VL_PREPROCESSOR, min_pixels=min_pixels, max_pixels=max_pixels)
        Path(d, "preprocessor_config.json").write_text(json.dumps(cfg))
        Path(d, "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
        kwargs = {} if backend is None else {"backend": backend}
        return AutoImageProcessor.from_pretrained(d, **kwargs)


def levels(delta: np.ndarray, std: np.ndarray) -> np.ndarray:
    """|Δ| of `[N, 3, rest]` normalised pixel values, expressed in 8-bit levels per channel."""
    return np.abs(delta) * (std[None, :, None] * 255.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/data/preprocess", help="fixture directory")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    std = np.asarray(QWEN25VL_PREPROCESSOR["image_std"], dtype=np.float64)
    processors: dict = {}
    records, samples = [], []
    default = make_processor(DEFAULT_MIN, DEFAULT_MAX)
    for index, (name, h, w, kind, seed, mn, mx, full) in enumerate(CASES):
        if (mn, mx) not in processors:
            processors[(mn, mx)] = (make_processor(mn, mx), make_processor(mn, mx, backend="pil"))
        proc, pil_proc = processors[(mn, mx)]
        image = Image.fromarray(pattern(h, w, kind, seed))
        rec = {
            "name": name,
            "height": h,
            "width": w,
            "pattern": kind,
            "seed": seed,
            "min-pixels": mn,
            "max-pixels": mx,
        }
        try:
            res = proc(images=[image], return_tensors="np")
        except ValueError as e:
            rec["error"] = str(e)
            records.append(rec)
            print(f"{name}: refused ({e})")
            continue
        pv = res["pixel_values"]
        t, gh, gw = (int(v) for v in res["image_grid_thw"][0])
        rh, rw = gh * 14, gw * 14
        # The resized 8-bit image, straight from the processor's own resize step.
        chw = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()[None]
        resized = proc.resize(chw, size=proc.size, resample=proc.resample, factor=28)[0]
        resized = resized.permute(1, 2, 0).contiguous().numpy()
        assert resized.shape == (rh, rw, 3), (name, resized.shape)
        # Sanity: inverting the normalisation of pixel_values gives back that image.
        unpatched = (
            pv.reshape(gh // 2, gw // 2, 2, 2, 3, 2, 14, 14)[:, :, :, :, :, 0]
            .transpose(0, 2, 5, 1, 3, 6, 4)
            .reshape(rh, rw, 3)
        )
        mean255 = np.float32(QWEN25VL_PREPROCESSOR["image_mean"]) * np.float32(255)
        std255 = np.float32(QWEN25VL_PREPROCESSOR["image_std"]) * np.float32(255)
        back = np.rint(unpatched * std255 + mean255)
        assert np.array_equal(back, resized), f"{name}: pixel_values do not invert to the resized image"

        per_channel = pv.reshape(pv.shape[0], 3, -1).astype(np.float64)
        rec.update(
            {
                "resized": [rh, rw],
                "grid-thw": [t, gh, gw],
                "image-tokens": gh * gw // 4,
                "pixel-mean": [float(f"{v:.9g}") for v in per_channel.mean(axis=(0, 2))],
            }
        )
        pil = pil_proc(images=[image], return_tensors="np")
        pil_grid = [int(v) for v in pil["image_grid_thw"][0]]
        if pil_grid == [t, gh, gw]:
            d = levels(pil["pixel_values"].reshape(pv.shape[0], 3, -1) - per_channel, std)
            rec["pil-backend"] = {
                "same-grid": True,
                "mean-abs-levels": float(f"{d.mean():.4g}"),
                "max-abs-levels": float(f"{d.max():.4g}"),
            }
        else:
            rec["pil-backend"] = {"same-grid": False, "grid-thw": pil_grid}

        flat = resized.reshape(-1, 3).astype(np.uint32)
        if rh * rw <= SAMPLES_PER_CASE:
            idx = np.arange(rh * rw, dtype=np.uint32)
        else:
            rng = np.random.default_rng(1000 + index)
            idx = np.sort(rng.choice(rh * rw, SAMPLES_PER_CASE, replace=False)).astype(np.uint32)
        packed = (flat[idx, 0] << 16) | (flat[idx, 1] << 8) | flat[idx, 2]
        samples.append(np.stack([np.full_like(idx, index), idx, packed], axis=1))
        rec["samples"] = int(idx.size)
        if full:
            np.save(out / f"pv_{name}.npy", pv.astype("<f4"))
            Image.fromarray(resized).save(out / f"resized_{name}.png", optimize=True)
            rec["full-pixel-values"] = f"pv_{name}.npy"
            rec["resized-png"] = f"resized_{name}.png"
        records.append(rec)
        print(f"{name}: {h}x{w} -> {rh}x{rw} grid {[t, gh, gw]} pil {rec['pil-backend']}")

    # Many more sizes, grid only: log-uniform sides from 1 to 20000 under assorted pixel limits,
    # through the very function the processor calls.
    rng = np.random.default_rng(20251124)
    limits = [(DEFAULT_MIN, DEFAULT_MAX), (3136, 256 * 28 * 28), (256 * 28 * 28, 1280 * 28 * 28), (3136, 1003520)]
    extra = []
    for i in range(400):
        h, w = (int(v) for v in np.exp(rng.uniform(0, np.log(20000), 2)).round().clip(1))
        if i % 8 == 0:  # near-extreme aspect ratios
            w = max(1, int(round(h * rng.uniform(150, 250))))
        mn, mx = limits[i % len(limits)]
        try:
            rh, rw = qwen2_vl_smart_resize(h, w, factor=28, min_pixels=mn, max_pixels=mx)
            extra.append([h, w, mn, mx, rh, rw])
        except ValueError:
            extra.append([h, w, mn, mx, 0, 0])

    np.save(out / "samples.npy", np.concatenate(samples).astype("<u4"))
    ch, cw, ckind, cseed = CLI_SAMPLE
    Image.fromarray(pattern(ch, cw, ckind, cseed)).save(out / "cli_sample.png", optimize=True)
    meta = {
        "generator": "scripts/gen_preprocess_golden.py",
        "processor": f"{type(default).__module__}.{type(default).__name__}",
        "backend": default.backend,
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
        },
        "preprocessor-config": QWEN25VL_PREPROCESSOR,
        "samples-per-case": SAMPLES_PER_CASE,
        "cli-sample": {"file": "cli_sample.png", "height": ch, "width": cw, "pattern": ckind, "seed": cseed},
        "cases": records,
        "extra-sizes-columns": ["height", "width", "min-pixels", "max-pixels", "resized-height", "resized-width (0, 0: refused)"],
        "extra-sizes": extra,
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {len(os.listdir(out))} files, {total / 1024:.0f} KiB, to {out}")


if __name__ == "__main__":
    main()
