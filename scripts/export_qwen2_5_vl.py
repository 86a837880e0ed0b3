#!/usr/bin/env python3
"""Export a Qwen2.5-VL checkpoint to the deepeyes ONNX bundle (see docs/BUNDLE.md).

Two modes:

    export_qwen2_5_vl.py SRC_DIR OUT_DIR
        Converts a Hugging Face Qwen2.5-VL checkpoint directory (config.json, *.safetensors,
        tokenizer.json, preprocessor_config.json; e.g. DeepEyes-7B) into a bundle in OUT_DIR.

    export_qwen2_5_vl.py --tiny [--seed S] OUT_DIR
        Builds a random-weight tiny Qwen2.5-VL with a small byte-level BPE tokenizer, and writes
          OUT_DIR/hf/      its Hugging Face checkpoint (loadable with from_pretrained),
          OUT_DIR/bundle/  its ONNX bundle,
          OUT_DIR/bundle-external/  the same with each graph's weights in <graph>.onnx.data,
          OUT_DIR/golden/  reference outputs from transformers (a two-image prompt: prefill logits,
                           20 greedy decode steps, vision helper values) for the Rust tests;
        and, in a temporary directory, exports the model saved as a real checkpoint is (bf16,
        sharded) and checks that bundle too, so the path a DeepEyes-7B takes is run every time.

The vision tower of Qwen2.5-VL has data-dependent control flow (per-image loops over grid_thw,
attention split by cu_seqlens), so it is exported as a wrapper that reuses the checkpoint's
weights but takes the data-dependent pieces as inputs: rotary position ids, the window permutation
and its inverse, and the window / full attention masks as additive block-diagonal biases. The
runtime computes them from grid_thw (deepeyes-core/src/vision.rs). The decoder takes mRoPE
position ids and an additive attention bias, so the runtime owns causal masking, padding and the
decode-time position offset (cache length + rope delta).

Every export is checked: the ONNX graphs are run with onnxruntime on a small multimodal input and
compared with the transformers model (pass --no-check to skip, e.g. for a 7B on a small machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

BUNDLE_FORMAT = "deepeyes-qwen2_5_vl-onnx"
BUNDLE_VERSION = 1
OPSET = 18

# The protocol's special tokens; each must be a single id in the tokenizer.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<tool_response>",
    "</tool_response>",
]

# Qwen2's pre-tokenization split (letters, numbers one by one, punctuation runs, newlines).
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# PIL resampling codes -> deepeyes' ResampleFilter names.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos3", 2: "bilinear", 3: "bicubic"}

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Vision helpers (the reference the Rust port in deepeyes-core/src/vision.rs is tested against)
# --------------------------------------------------------------------------------------------


def vision_helpers(grid_thw: torch.Tensor, vcfg) -> dict[str, torch.Tensor]:
    """Everything the vision graph takes besides pixels, computed with transformers' helpers."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    merge = vcfg.spatial_merge_size
    pos_ids = get_vision_position_ids(grid_thw, merge)
    window_index, cu_window = get_vision_window_index(
        grid_thw, spatial_merge_size=merge, window_size=vcfg.window_size, patch_size=vcfg.patch_size
    )
    cu_full = get_vision_cu_seqlens(grid_thw)
    n = int(pos_ids.shape[0])
    return {
        "pos_ids": pos_ids.to(torch.int64),
        "window_index": window_index.to(torch.int64),
        "reverse_index": torch.argsort(window_index).to(torch.int64),
        "cu_window_seqlens": cu_window.to(torch.int64),
        "cu_seqlens": cu_full.to(torch.int64),
        "window_mask": segment_mask(cu_window, n),
        "full_mask": segment_mask(cu_full, n),
    }


def segment_mask(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Additive [n, n] bias: 0 inside each [cu[i], cu[i+1]) block, -inf elsewhere."""
    seg = torch.zeros(n, dtype=torch.int64)
    cu = cu_seqlens.tolist()
    for i in range(len(cu) - 1):
        seg[cu[i] : cu[i + 1]] = i
    same = seg[:, None] == seg[None, :]
    return torch.where(same, 0.0, float("-inf")).to(torch.float32)


# --------------------------------------------------------------------------------------------
# Export wrappers
# --------------------------------------------------------------------------------------------


class VisionCore(nn.Module):
    """The vision tower with window/full attention expressed as additive masks."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.unit = visual.spatial_merge_unit
        self.fullatt = set(visual.fullatt_block_indexes)

    def _permute(self, x: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return x.reshape(n // self.unit, self.unit, -1)[window_index].reshape(n, -1)

    def forward(self, pixel_values, pos_ids, window_index, reverse_index, window_mask, full_mask):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        v = self.visual
        dtype = v.patch_embed.proj.weight.dtype
        h = v.patch_embed(pixel_values.to(dtype))
        h = self._permute(h, window_index)
        cos, sin = v.rotary_pos_emb(h, pos_ids)
        cos = self._permute(cos, window_index)
        sin = self._permute(sin, window_index)
        window_mask = window_mask.to(torch.float32)
        full_mask = full_mask.to(torch.float32)
        n = h.shape[0]
        for i, blk in enumerate(v.blocks):
            mask = full_mask if i in self.fullatt else window_mask
            attn = blk.attn
            x = blk.norm1(h)
            q, k, val = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, val = q.transpose(0, 1), k.transpose(0, 1), val.transpose(0, 1)
            scores = torch.matmul(q, k.transpose(1, 2)).float() * attn.scaling + mask
            probs = torch.softmax(scores, dim=-1).to(val.dtype)
            out = torch.matmul(probs, val).transpose(0, 1).reshape(n, -1)
            h = h + attn.proj(out)
            h = h + blk.mlp(blk.norm2(h))
        merged = v.merger(h)
        return merged[reverse_index].to(torch.float32)


class EmbedCore(nn.Module):
    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids).to(torch.float32)


class DecoderCore(nn.Module):
    """The language model with an explicit KV cache, mRoPE positions and additive attention bias.

    `logits_positions[b, k]` selects which positions of row b get logits, so a prefill of a long
    prompt computes only the last position's logits (the lm_head is the largest matmul).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        self.text_config = model.config.text_config
        self.num_layers = self.text_config.num_hidden_layers

    def forward(self, inputs_embeds, position_ids, attn_bias, logits_positions, *past):
        from transformers import DynamicCache

        dtype = self.lm_head.weight.dtype
        cache = DynamicCache(config=self.text_config)
        for i in range(self.num_layers):
            cache.update(past[2 * i].to(dtype), past[2 * i + 1].to(dtype), i)
        bias = attn_bias.to(dtype)
        out = self.lm(
            inputs_embeds=inputs_embeds.to(dtype),
            position_ids=position_ids,
            attention_mask={"full_attention": bias, "sliding_attention": bias},
            cache=cache,
            use_cache=True,
        )
        hidden = out.last_hidden_state
        idx = logits_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        picked = torch.gather(hidden, 1, idx)
        logits = self.lm_head(picked).to(torch.float32)
        presents = []
        for i in range(self.num_layers):
            presents.append(cache.layers[i].keys)
            presents.append(cache.layers[i].values)
        return (logits, *presents)


# --------------------------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------------------------


def rename_dims(path: Path, renames: dict[str, dict[int, str]]) -> None:
    """Give the graph's dynamic input/output dims readable names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = renames.get(value.name)
        if not dims:
            continue
        shape = value.type.tensor_type.shape
        for axis, name in dims.items():
            d = shape.dim[axis]
            d.ClearField("dim_value")
            d.dim_param = name
    onnx.save(model, str(path))


def export_graph(module, args, path: Path, input_names, output_names, dynamic_shapes, renames, external):
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            external_data=external,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=external)
    rename_dims(path, renames)
    log(f"exported {path.name} in {time.time() - t0:.1f} s")


def export_bundle(model, out_dir: Path, external: bool) -> None:
    from torch.export import Dim

    cfg = model.config
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    if getattr(tcfg, "use_sliding_window", False):
        raise SystemExit("sliding-window attention layers are not supported by this exporter")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()

    # --- vision: example of two images so window masks are non-trivial.
    grid = torch.tensor([[1, 12, 10], [1, 4, 18]])
    helpers = vision_helpers(grid, vcfg)
    n = int(helpers["pos_ids"].shape[0])
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    pix = torch.randn(n, patch_dim)
    vargs = (
        pix,
        helpers["pos_ids"],
        helpers["window_index"],
        helpers["reverse_index"],
        helpers["window_mask"],
        helpers["full_mask"],
    )
    merged = Dim("merged", min=1)
    patches = 4 * merged if vcfg.spatial_merge_size == 2 else vcfg.spatial_merge_size**2 * merged
    vshapes = (
        {0: patches},
        {0: patches},
        {0: merged},
        {0: merged},
        {0: patches, 1: patches},
        {0: patches, 1: patches},
    )
    vin = ["pixel_values", "pos_ids", "window_index", "reverse_index", "window_mask", "full_mask"]
    vrenames = {k: {0: "patches"} for k in ("pixel_values", "pos_ids")}
    vrenames.update({k: {0: "merged"} for k in ("window_index", "reverse_index", "image_embeds")})
    vrenames.update({k: {0: "patches", 1: "patches"} for k in ("window_mask", "full_mask")})
    with torch.no_grad():
        export_graph(
            VisionCore(model.model.visual), vargs, out_dir / "vision.onnx", vin, ["image_embeds"],
            vshapes, vrenames, external,
        )

    # --- embed
    batch, seq = Dim("batch", min=1), Dim("seq", min=1)
    ids = torch.randint(0, tcfg.vocab_size, (2, 5))
    with torch.no_grad():
        export_graph(
            EmbedCore(model.model.language_model.embed_tokens), (ids,), out_dir / "embed.onnx",
            ["input_ids"], ["inputs_embeds"], ({0: batch, 1: seq},),
            {"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}}, external,
        )

    # --- decoder with KV cache
    layers = tcfg.num_hidden_layers
    kv_heads = tcfg.num_key_value_heads
    head_dim = tcfg.hidden_size // tcfg.num_attention_heads
    b, s, p = 2, 5, 3
    past = []
    for _ in range(layers):
        past.append(torch.randn(b, kv_heads, p, head_dim))
        past.append(torch.randn(b, kv_heads, p, head_dim))
    dargs = (
        torch.randn(b, s, tcfg.hidden_size),
        torch.arange(s).view(1, 1, s).expand(3, b, s).contiguous() + p,
        causal_bias(b, s, p),
        torch.tensor([[s - 1], [s - 2]]),
        *past,
    )
    past_len, keep = Dim("past", min=0), Dim("keep", min=1)
    dshapes = (
        {0: batch, 1: seq},
        {1: batch, 2: seq},
        {0: batch, 2: seq, 3: Dim.AUTO},
        {0: batch, 1: keep},
        # `*past` is one vararg: its shapes go in a nested tuple.
        tuple({0: batch, 2: past_len} for _ in range(2 * layers)),
    )
    din = ["inputs_embeds", "position_ids", "attn_bias", "logits_positions"]
    dout = ["logits"]
    for i in range(layers):
        din += [f"past_key_{i}", f"past_value_{i}"]
        dout += [f"present_key_{i}", f"present_value_{i}"]
    drenames = {
        "inputs_embeds": {0: "batch", 1: "seq"},
        "position_ids": {1: "batch", 2: "seq"},
        "attn_bias": {0: "batch", 2: "seq", 3: "total"},
        "logits_positions": {0: "batch", 1: "keep"},
        "logits": {0: "batch", 1: "keep"},
    }
    for i in range(layers):
        for kind in ("key", "value"):
            drenames[f"past_{kind}_{i}"] = {0: "batch", 2: "past"}
            drenames[f"present_{kind}_{i}"] = {0: "batch", 2: "total"}
    with torch.no_grad():
        export_graph(DecoderCore(model), dargs, out_dir / "decoder.onnx", din, dout, dshapes, drenames, external)


def causal_bias(b: int, s: int, p: int) -> torch.Tensor:
    """[b, 1, s, p+s] additive causal bias for a chunk of s tokens after p cached ones."""
    q = torch.arange(s).view(s, 1) + p
    k = torch.arange(p + s).view(1, p + s)
    bias = torch.where(k <= q, 0.0, float("-inf"))
    return bias.view(1, 1, s, p + s).expand(b, 1, s, p + s).contiguous()


# --------------------------------------------------------------------------------------------
# Bundle config
# --------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def eos_ids(src: Path, cfg) -> list[int]:
    gen = read_json(src / "generation_config.json")
    eos = gen.get("eos_token_id", getattr(cfg.text_config, "eos_token_id", None))
    if eos is None:
        eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def bundle_config(model, src: Path, external: bool) -> dict:
    cfg = model.config
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    pre = read_json(src / "preprocessor_config.json")
    size = pre.get("size") or {}
    if abs(float(pre.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9 or not pre.get("do_normalize", True):
        raise SystemExit("only rescale_factor 1/255 with normalisation is supported (preprocessor_config.json)")
    if int(pre.get("resample", 3)) not in RESAMPLE_NAMES:
        raise SystemExit(f"unsupported resample filter {pre.get('resample')} in preprocessor_config.json")
    rope = dict(tcfg.rope_parameters or {})
    vrope = dict(getattr(vcfg, "rope_parameters", None) or {})
    pad = tcfg.pad_token_id if tcfg.pad_token_id is not None else getattr(cfg, "pad_token_id", None)
    eos = eos_ids(src, cfg)
    if pad is None:
        pad = eos[0] if eos else 0
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "graphs": {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"},
        "tokenizer": "tokenizer.json",
        "dtype": dtype,
        "external-data": external,
        "text": {
            "vocab-size": int(tcfg.vocab_size),
            "hidden-size": int(tcfg.hidden_size),
            "num-layers": int(tcfg.num_hidden_layers),
            "num-heads": int(tcfg.num_attention_heads),
            "num-kv-heads": int(tcfg.num_key_value_heads),
            "head-dim": int(tcfg.hidden_size // tcfg.num_attention_heads),
            "rope-theta": float(rope.get("rope_theta", 1e6)),
            "mrope-section": [int(x) for x in rope.get("mrope_section", [16, 24, 24])],
            "max-positions": int(tcfg.max_position_embeddings),
            "rms-norm-eps": float(tcfg.rms_norm_eps),
        },
        "vision": {
            "depth": int(vcfg.depth),
            "hidden-size": int(vcfg.hidden_size),
            "num-heads": int(vcfg.num_heads),
            "out-hidden-size": int(vcfg.out_hidden_size),
            "in-channels": int(vcfg.in_channels),
            "patch-size": int(vcfg.patch_size),
            "spatial-merge-size": int(vcfg.spatial_merge_size),
            "temporal-patch-size": int(vcfg.temporal_patch_size),
            "window-size": int(vcfg.window_size),
            "fullatt-block-indexes": [int(i) for i in vcfg.fullatt_block_indexes],
            "tokens-per-second": int(getattr(vcfg, "tokens_per_second", 2)),
            "rope-theta": float(vrope.get("rope_theta", 10000.0)),
        },
        "preprocess": {
            "patch-size": int(pre.get("patch_size", vcfg.patch_size)),
            "merge-size": int(pre.get("merge_size", vcfg.spatial_merge_size)),
            "temporal-patch-size": int(pre.get("temporal_patch_size", vcfg.temporal_patch_size)),
            "min-pixels": int(pre.get("min_pixels", size.get("shortest_edge", 56 * 56))),
            "max-pixels": int(pre.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))),
            "max-aspect-ratio": 200.0,
            "image-mean": [float(x) for x in pre.get("image_mean", CLIP_MEAN)],
            "image-std": [float(x) for x in pre.get("image_std", CLIP_STD)],
            "resample": RESAMPLE_NAMES[int(pre.get("resample", 3))],
        },
        "tokens": {
            "image-pad": int(cfg.image_token_id),
            "video-pad": int(cfg.video_token_id),
            "vision-start": int(cfg.vision_start_token_id),
            "vision-end": int(cfg.vision_end_token_id),
            "pad": int(pad),
            "eos": eos,
        },
    }


# --------------------------------------------------------------------------------------------
# Checks: ONNX Runtime vs transformers
# --------------------------------------------------------------------------------------------


def ort_sessions(bundle: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    mk = lambda name: ort.InferenceSession(str(bundle / name), opts, providers=["CPUExecutionProvider"])
    return mk("vision.onnx"), mk("embed.onnx"), mk("decoder.onnx")


def rope_index(model, input_ids: torch.Tensor, grid: torch.Tensor):
    image_id = model.config.image_token_id
    mm = (input_ids == image_id).to(torch.int32)
    return model.model.get_rope_index(input_ids, mm_token_type_ids=mm, image_grid_thw=grid)


def ort_prefill(sessions, model, input_ids, pixel_values, grid, layers, kv_heads, head_dim):
    """The full multimodal prefill through the three ONNX graphs; returns (logits, presents, delta)."""
    vision, embed, decoder = sessions
    vh = vision_helpers(grid, model.config.vision_config)
    feats = vision.run(
        None,
        {
            "pixel_values": pixel_values.numpy(),
            "pos_ids": vh["pos_ids"].numpy(),
            "window_index": vh["window_index"].numpy(),
            "reverse_index": vh["reverse_index"].numpy(),
            "window_mask": vh["window_mask"].numpy(),
            "full_mask": vh["full_mask"].numpy(),
        },
    )[0]
    emb = embed.run(None, {"input_ids": input_ids.numpy()})[0]
    mask = (input_ids[0] == model.config.image_token_id).numpy()
    emb[0, mask] = feats
    pos, delta = rope_index(model, input_ids, grid)
    s = input_ids.shape[1]
    feeds = {
        "inputs_embeds": emb,
        "position_ids": pos.numpy().astype(np.int64),
        "attn_bias": causal_bias(1, s, 0).numpy(),
        "logits_positions": np.arange(s, dtype=np.int64)[None],
    }
    for i in range(layers):
        feeds[f"past_key_{i}"] = np.zeros((1, kv_heads, 0, head_dim), np.float32)
        feeds[f"past_value_{i}"] = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    outs = decoder.run(None, feeds)
    return outs[0], outs[1:], int(delta.reshape(-1)[0]), feats


def ort_step(sessions, token: int, presents, cache_len: int, delta: int, layers):
    _, embed, decoder = sessions
    emb = embed.run(None, {"input_ids": np.array([[token]], np.int64)})[0]
    pos = np.full((3, 1, 1), cache_len + delta, np.int64)
    feeds = {
        "inputs_embeds": emb,
        "position_ids": pos,
        "attn_bias": np.zeros((1, 1, 1, cache_len + 1), np.float32),
        "logits_positions": np.zeros((1, 1), np.int64),
    }
    for i in range(layers):
        feeds[f"past_key_{i}"] = presents[2 * i]
        feeds[f"past_value_{i}"] = presents[2 * i + 1]
    outs = decoder.run(None, feeds)
    return outs[0][0, 0], outs[1:]


def hf_reference(model, input_ids, pixel_values, grid, steps: int):
    """transformers' prefill logits and `steps` greedy decode steps (logits + tokens)."""
    mm = (input_ids == model.config.image_token_id).to(torch.int32)
    model.model.rope_deltas = None
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            mm_token_type_ids=mm,
            use_cache=True,
        )
        prefill = out.logits[0].float()
        cache = out.cache
        tokens = [int(prefill[-1].argmax())]
        step_logits = []
        for _ in range(steps):
            nxt = torch.tensor([[tokens[-1]]])
            out = model(input_ids=nxt, cache=cache, use_cache=True, mm_token_type_ids=torch.zeros_like(nxt))
            cache = out.cache
            logits = out.logits[0, -1].float()
            step_logits.append(logits)
            tokens.append(int(logits.argmax()))
    return prefill, torch.stack(step_logits), tokens


def check_bundle(model, bundle: Path, input_ids, pixel_values, grid, steps: int = 5, tol: float = 1e-4):
    """Runs the bundle with onnxruntime and compares with transformers; raises on a mismatch."""
    tcfg = model.config.text_config
    layers, kv_heads = tcfg.num_hidden_layers, tcfg.num_key_value_heads
    head_dim = tcfg.hidden_size // tcfg.num_attention_heads
    sessions = ort_sessions(bundle)
    hf_prefill, hf_steps, hf_tokens = hf_reference(model, input_ids, pixel_values, grid, steps)
    logits, presents, delta, _ = ort_prefill(
        sessions, model, input_ids, pixel_values, grid, layers, kv_heads, head_dim
    )
    worst = float(np.abs(logits[0] - hf_prefill.numpy()).max())
    cache_len = input_ids.shape[1]
    tokens = [int(logits[0, -1].argmax())]
    for i in range(steps):
        step, presents = ort_step(sessions, tokens[-1], presents, cache_len, delta, layers)
        cache_len += 1
        worst = max(worst, float(np.abs(step - hf_steps[i].numpy()).max()))
        tokens.append(int(step.argmax()))
    log(f"check: ONNX Runtime vs transformers, prefill + {steps} decode steps: max |Δlogits| = {worst:.2e}")
    if worst > tol or tokens != hf_tokens:
        raise SystemExit(
            f"the exported bundle disagrees with transformers (max |Δ| {worst:.2e}, tokens {tokens} vs {hf_tokens})"
        )
    return worst


# --------------------------------------------------------------------------------------------
# Inputs: images, processor, prompt
# --------------------------------------------------------------------------------------------


def image_processor(src: Path | None, min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)


def synthetic_image(width: int, height: int, seed: int):
    """A smooth, compressible test picture: gradients, a disc and some text-like bars."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / (7 + seed)),
            255 * y / max(height - 1, 1),
            128 + 90 * np.cos((x + y) / 11),
        ],
        axis=-1,
    )
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.rectangle([x0, y0, x0 + int(rng.integers(4, 30)), y0 + int(rng.integers(2, 8))], fill=color)
    r = min(width, height) // 4
    draw.ellipse([width // 2 - r, height // 2 - r, width // 2 + r, height // 2 + r], outline=(250, 20, 20), width=3)
    return img


def render_prompt(question: str, images: int, tools_json: str) -> str:
    system = (
        "You are a careful visual assistant.\n\n# Tools\n<tools>\n" + tools_json + "\n</tools>"
    )
    user = "<|vision_start|><|image_pad|><|vision_end|>" * images + question
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def expand_pads(ids: list[int], pad_id: int, counts: list[int]) -> list[int]:
    out, k = [], 0
    for t in ids:
        if t == pad_id:
            out.extend([pad_id] * counts[k])
            k += 1
        else:
            out.append(t)
    assert k == len(counts), "image pad count mismatch"
    return out


# --------------------------------------------------------------------------------------------
# Tiny model
# --------------------------------------------------------------------------------------------

WORDS = (
    "the a an of to in on at by with from for and or but not is are was were be been look see zoom "
    "image picture photo crop region box corner left right top bottom center small large red green "
    "blue yellow black white sign text number letter word car person dog cat tree house window door "
    "street table chart label price clock time color shape circle square line answer question think "
    "because therefore so first then finally detail closer clearly visible hidden tiny far near"
).split()


def training_corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])
        kind = i % 6
        if kind == 0:
            x0, y0 = rng.randint(0, 500), rng.randint(0, 500)
            bbox = [x0, y0, x0 + rng.randint(10, 300), y0 + rng.randint(10, 300)]
            call = {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": bbox, "label": " ".join(words[:3])}}
            out.append(f"<think>{sentence}</think>\n<tool_call>\n{json.dumps(call)}\n</tool_call>")
        elif kind == 1:
            out.append(f"<think>{sentence}</think>\n<answer>{rng.choice(WORDS)} {rng.randint(0, 9999)}</answer>")
        elif kind == 2:
            out.append(f"{sentence} {rng.randint(0, 100000)} {rng.random():.3f}")
        else:
            out.append(sentence)
    return out


def build_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(seed), trainer=trainer)
    for t in SPECIAL_TOKENS:
        assert tok.token_to_id(t) is not None, t
        assert tok.encode(t).ids == [tok.token_to_id(t)], t
    return tok


def random_model(tok, text: dict, vision: dict, seed: int):
    """A random-weight Qwen2_5_VLForConditionalGeneration (torch's default init from `seed`) with
    `tok`'s special-token ids, the text widths `text` and the vision widths `vision`; patches,
    merging and windows are Qwen2.5-VL's (14 px, 2 x 2, 112 px)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    text_config = dict(
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        **text,
    )
    vision_config = dict(
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        tokens_per_second=2,
        **vision,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny(seed: int, vocab_size: int = 1024):
    tok = build_tokenizer(vocab_size, seed)
    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2]},
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]
    )
    model = random_model(tok, text, vision, seed)
    # Default init (std 0.02) makes every logit nearly equal; wider weights give the greedy
    # path clear winners, so the parity test checks real decisions, not float noise.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p.numel() // p.shape[0]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model, tok


def save_hf(model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2TokenizerFast",
                "model_max_length": 32768,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "additional_special_tokens": SPECIAL_TOKENS[1:],
            },
            indent=2,
        )
        + "\n"
    )
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "min_pixels": 56 * 56,
                "max_pixels": 28 * 28 * 1280,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": CLIP_MEAN,
                "image_std": CLIP_STD,
                "rescale_factor": 1 / 255,
                "do_resize": True,
                "do_rescale": True,
                "do_normalize": True,
                "do_convert_rgb": True,
                "resample": 3,
            },
            indent=2,
        )
        + "\n"
    )
    gen = {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
           "pad_token_id": tok.token_to_id("<|endoftext|>")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# Sizes chosen so the grids are 12x10 and 4x18 patches: 6x5 and 2x9 merged tokens, i.e. several
# windows of 4x4 merged tokens per image, some partial (non-trivial window masks).
GOLDEN_IMAGES = [(140, 170), (250, 60)]  # (width, height)
GOLDEN_QUESTION = "What is written on the small sign at the left, and what color is the disc?"
DECODE_STEPS = 20
ZOOM_TOOL_JSON = json.dumps(
    {
        "type": "function",
        "function": {
            "name": "image_zoom_in_tool",
            "description": "Zoom in on a region of the image.",
            "parameters": {"type": "object", "properties": {"bbox_2d": {"type": "array"}}, "required": ["bbox_2d"]},
        },
    }
)
# Extra grids for the Rust port of the vision helpers: square, tall, wide, exact window
# multiples (empty padding windows), a video-like t=2, and the 7B default window size ratio.
HELPER_GRIDS = [[1, 4, 4], [1, 8, 8], [1, 16, 12], [1, 6, 22], [2, 8, 6], [1, 2, 40], [1, 30, 2]]


def make_golden(model, tok, out: Path, hf_dir: Path) -> dict:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    pre = read_json(hf_dir / "preprocessor_config.json")
    proc = image_processor(hf_dir, pre["min_pixels"], pre["max_pixels"])
    images = []
    for k, (w, h) in enumerate(GOLDEN_IMAGES):
        img = synthetic_image(w, h, seed=k)
        img.save(out / f"image{k}.png", optimize=True)
        images.append(img)
    enc = proc(images=images, return_tensors="pt")
    pixel_values = enc["pixel_values"].float()
    grid = enc["image_grid_thw"].long()
    merge = model.config.vision_config.spatial_merge_size
    counts = [int(g.prod()) // merge**2 for g in grid]
    prompt = render_prompt(GOLDEN_QUESTION, len(images), ZOOM_TOOL_JSON)
    (out / "prompt.txt").write_text(prompt)
    ids = tok.encode(prompt).ids
    image_id = model.config.image_token_id
    expanded = expand_pads(ids, image_id, counts)
    input_ids = torch.tensor([expanded])

    prefill, steps, tokens = hf_reference(model, input_ids, pixel_values, grid, DECODE_STEPS)
    # Cross-check the manual loop against transformers' own generate().
    mm = (input_ids == image_id).to(torch.int32)
    model.model.rope_deltas = None
    with torch.no_grad():
        gen = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=mm,
            max_new_tokens=DECODE_STEPS + 1, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    gen_tokens = gen[0, input_ids.shape[1]:].tolist()
    if gen_tokens != tokens:
        raise SystemExit(f"manual greedy loop {tokens} differs from generate() {gen_tokens}")
    with torch.no_grad():
        image_embeds = torch.cat(model.model.get_image_features(pixel_values, grid).pooler_output).float()
    positions, delta = rope_index(model, input_ids, grid)
    vh = vision_helpers(grid, model.config.vision_config)
    # Prefill logits of every third position and the last eight keep the file small while
    # covering text, both images and the end of the prompt.
    s = input_ids.shape[1]
    kept = sorted(set(range(0, s, 3)) | set(range(max(0, s - 8), s)))

    tensors = {
        "prompt_ids": np.array(ids, np.int64),
        "input_ids": input_ids[0].numpy().astype(np.int64),
        "pixel_values": pixel_values.numpy().astype(np.float32),
        "image_grid_thw": grid.numpy().astype(np.int64),
        "position_ids": positions[:, 0].numpy().astype(np.int64),
        "rope_delta": delta.reshape(-1).numpy().astype(np.int64),
        "vision_pos_ids": vh["pos_ids"].numpy(),
        "window_index": vh["window_index"].numpy(),
        "cu_window_seqlens": vh["cu_window_seqlens"].numpy(),
        "cu_seqlens": vh["cu_seqlens"].numpy(),
        "image_embeds": image_embeds.numpy(),
        "prefill_positions": np.array(kept, np.int64),
        "prefill_logits": prefill[kept].numpy().astype(np.float32),
        "decode_logits": steps.numpy().astype(np.float32),
        "tokens": np.array(tokens, np.int64),
    }
    save_file(tensors, str(out / "golden.safetensors"))

    # Reference values of the vision helpers and the rope index for more shapes.
    helpers = []
    vcfg = model.config.vision_config
    for g in HELPER_GRIDS:
        gt = torch.tensor([g])
        h = vision_helpers(gt, vcfg)
        helpers.append(
            {
                "grid_thw": g,
                "pos_ids": h["pos_ids"].tolist(),
                "window_index": h["window_index"].tolist(),
                "cu_window_seqlens": h["cu_window_seqlens"].tolist(),
                "cu_seqlens": h["cu_seqlens"].tolist(),
            }
        )
    two = torch.tensor([[1, 8, 6], [1, 4, 10]])
    h = vision_helpers(two, vcfg)
    helpers.append(
        {
            "grid_thw": two.tolist(),
            "pos_ids": h["pos_ids"].tolist(),
            "window_index": h["window_index"].tolist(),
            "cu_window_seqlens": h["cu_window_seqlens"].tolist(),
            "cu_seqlens": h["cu_seqlens"].tolist(),
        }
    )
    rope_cases = []
    rng = random.Random(7)
    for grids in ([[1, 4, 4]], [[1, 8, 6], [1, 4, 10]], [[1, 2, 40], [1, 30, 2], [1, 6, 6]]):
        seq, types = [], []
        for g in grids:
            seq += [rng.randrange(0, 900) for _ in range(rng.randint(0, 5))] + [model.config.vision_start_token_id]
            seq += [image_id] * (g[0] * g[1] * g[2] // merge**2)
            seq += [model.config.vision_end_token_id]
        seq += [rng.randrange(0, 900) for _ in range(3)]
        t = torch.tensor([seq])
        pos, d = rope_index(model, t, torch.tensor(grids))
        rope_cases.append(
            {"input_ids": seq, "grid_thw": grids, "position_ids": pos[:, 0].tolist(), "rope_delta": int(d.reshape(-1)[0])}
        )
    (out / "vision_reference.json").write_text(
        json.dumps(
            {
                "spatial-merge-size": vcfg.spatial_merge_size,
                "window-size": vcfg.window_size,
                "patch-size": vcfg.patch_size,
                "image-pad": image_id,
                "vision": helpers,
                "rope": rope_cases,
            },
            separators=(",", ":"),
        )
        + "\n"
    )
    return {"input_ids": input_ids, "pixel_values": pixel_values, "grid": grid, "tokens": tokens}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def write_bundle(model, src: Path, out: Path, external: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # The ONNX optimizer merges initializers with equal values (the all-ones norms and zero
    # biases of a fresh model) into one, and then one parameter could not be replaced without
    # the others. So the graphs are exported from a copy of the weights shifted to distinct
    # values, and the true values are written back afterwards (scripts/map_bundle_weights.py).
    real = {n: p.detach().float().cpu().numpy().copy() for n, p in model.named_parameters()}
    with torch.no_grad():
        for k, (_, p) in enumerate(model.named_parameters()):
            p.add_(1e-3 * (k + 1))
    try:
        export_bundle(model, out, external)
        tokenizer = src / "tokenizer.json"
        if not tokenizer.exists():
            raise SystemExit(f"{tokenizer} not found: the bundle needs the checkpoint's tokenizer.json")
        shutil.copyfile(tokenizer, out / "tokenizer.json")
        # The prompt templates and agent-loop limits the checkpoint was trained with (deepeyes
        # init-tinyeyes and the base stage write them).
        for name in ("templates.toml", "agent.toml", "tools.toml"):
            if (src / name).exists():
                shutil.copyfile(src / name, out / name)
        cfg = bundle_config(model, src, external)
        (out / "bundle.json").write_text(json.dumps(cfg, indent=2) + "\n")
        log(f"wrote {out / 'bundle.json'}")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from map_bundle_weights import write_weight_map

        # The model still holds the shifted values the graphs were exported from: match against
        # views of them rather than a copy (a 7B's float32 weights are 30 GB; `real` is one copy
        # already).
        marked = {n: p.detach().numpy() for n, p in model.named_parameters()}
        write_weight_map(out, src, marked=marked, real=real)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.from_numpy(real[n]).to(p.dtype))


def sample_inputs(model, tok_path: Path, src: Path):
    """A small two-image prompt for the export check of an arbitrary checkpoint."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    pre = read_json(src / "preprocessor_config.json")
    size = pre.get("size") or {}
    proc = image_processor(
        src, pre.get("min_pixels", size.get("shortest_edge", 3136)), pre.get("max_pixels", size.get("longest_edge", 1003520))
    )
    images = [synthetic_image(w, h, seed=k) for k, (w, h) in enumerate(GOLDEN_IMAGES)]
    enc = proc(images=images, return_tensors="pt")
    merge = model.config.vision_config.spatial_merge_size
    counts = [int(g.prod()) // merge**2 for g in enc["image_grid_thw"]]
    ids = tok.encode(render_prompt("Describe both images.", 2, ZOOM_TOOL_JSON)).ids
    expanded = expand_pads(ids, model.config.image_token_id, counts)
    dtype = next(model.parameters()).dtype
    return torch.tensor([expanded]), enc["pixel_values"].to(dtype), enc["image_grid_thw"].long()


def check_sharded_bf16(model, hf_dir: Path, golden: dict) -> None:
    """Saves `model` as released checkpoints are (bf16, several shards), exports that directory
    like any SRC_DIR, with external-data graphs as for a 7B, and checks the bundle against
    transformers; nothing is kept."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "hf", Path(tmp) / "bundle"
        model.to(torch.bfloat16).save_pretrained(src, max_shard_size="300KB")
        model.to(torch.float32)
        shards = sorted(p.name for p in src.glob("*.safetensors"))
        if len(shards) < 2:
            raise SystemExit(f"expected a sharded checkpoint, got {shards}")
        for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
            shutil.copyfile(hf_dir / name, src / name)
        bf16 = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            src, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        # As a 7B is exported: graphs with external data.
        write_bundle(bf16, src, out, external=True)
        if not (out / "decoder.onnx.data").is_file():
            raise SystemExit("the external-data export wrote no decoder.onnx.data")
        check_bundle(bf16, out, golden["input_ids"], golden["pixel_values"], golden["grid"], steps=3)
        log(f"a bf16 checkpoint in {len(shards)} shards exported with external data and checked")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="DIR", help="SRC_DIR OUT_DIR, or OUT_DIR with --tiny")
    ap.add_argument("--tiny", action="store_true", help="build and export a random-weight tiny model")
    ap.add_argument("--seed", type=int, default=0, help="seed of the tiny model (default 0)")
    ap.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs transformers check")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--external-data",
        action="store_true",
        help="store the weights in <graph>.onnx.data files even for a small model (default: only above 1.5 GB)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.tiny:
        if len(args.paths) != 1:
            ap.error("--tiny takes exactly one OUT_DIR")
        out = Path(args.paths[0])
        hf_dir, bundle_dir, golden_dir = out / "hf", out / "bundle", out / "golden"
        # The same model with its weights in <graph>.onnx.data files, as a 7B is exported.
        external_dir = out / "bundle-external"
        for d in (hf_dir, bundle_dir, golden_dir, external_dir):
            if d.exists():
                shutil.rmtree(d)
        t0 = time.time()
        model, tok = build_tiny(args.seed)
        save_hf(model, tok, hf_dir)
        log(f"built the tiny model ({sum(p.numel() for p in model.parameters())} parameters) in {time.time() - t0:.1f} s")
        write_bundle(model, hf_dir, bundle_dir, external=False)
        write_bundle(model, hf_dir, external_dir, external=True)
        golden = make_golden(model, tok, golden_dir, hf_dir)
        for d in (bundle_dir, external_dir):
            check_bundle(model, d, golden["input_ids"], golden["pixel_values"], golden["grid"], steps=DECODE_STEPS)
        check_sharded_bf16(model, hf_dir, golden)
        log(f"golden tokens: {golden['tokens']}")
        return 0

    if len(args.paths) != 2:
        ap.error("expected SRC_DIR OUT_DIR (or --tiny OUT_DIR)")
    src, out = Path(args.paths[0]), Path(args.paths[1])
    if not (src / "config.json").exists():
        raise SystemExit(f"{src}: not a Hugging Face checkpoint directory (no config.json)")
    from transformers import Qwen2_5_VLForConditionalGeneration

    t0 = time.time()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    log(f"loaded {src} in {time.time() - t0:.1f} s")
    big = sum(p.numel() for p in model.parameters()) * 4 > 1_500_000_000
    write_bundle(model, src, out, external=big or args.external_data)
    if not args.no_check:
        ids, pix, grid = sample_inputs(model, src / "tokenizer.json", src)
        check_bundle(model, out, ids, pix, grid, steps=3, tol=1e-3 if big else 1e-4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
