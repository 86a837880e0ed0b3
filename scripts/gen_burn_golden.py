#!/usr/bin/env python3
"""Reference values from transformers for the burn Qwen2.5-VL (deepeyes-rl/src/model/).

    gen_burn_golden.py [--out tests/data/burn] [--checkpoint DIR] [--seed S]

Uses the shared tiny checkpoint tests/data/tiny-qwen2_5_vl/hf/ when it exists (so burn, ONNX
Runtime and transformers all run the same weights), or --checkpoint DIR. Without either it builds
a random tiny Qwen2.5-VL (vocab 1024, hidden 64, 2 layers, 4 heads, 2 KV heads, mrope_section
[4,2,2]; vision depth 2, hidden 32, 2 heads, out 64, window 112, full attention in block 1) and
saves it under OUT/tiny-hf/.

Writes OUT/golden.safetensors with:
  * a two-image multimodal prompt (grids 1x10x12 and 1x4x6, so window attention has several
    windows): input_ids, mm_token_type_ids, pixel_values, image_grid_thw;
  * transformers' helper outputs: vision_pos_ids, window_index, cu_window_seqlens, cu_seqlens,
    position_ids (get_rope_index with mm_token_type_ids), rope_deltas;
  * image_embeds (the vision tower) and logits of the full forward;
  * a text-only second prompt (text_input_ids, text_logits) for the padded-batch test;
  * gradients of  L = sum_t w_t * logp_t + 0.05 * sum_t entropy_t  over the multimodal prompt's
    next-token predictions whose target is not an image pad (w = grad_weights, w[i] weighs the
    prediction of token i+1): the full gradient of a few parameters (grad.<name>) and the L2 norm of
    every parameter's gradient (grad_norms, names in the metadata key "grad_names").
The metadata key "checkpoint" holds the checkpoint directory relative to the repository root.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_FIXTURE = ROOT / "tests" / "data" / "tiny-qwen2_5_vl" / "hf"

# Parameters whose whole gradient is stored (small ones, spread over the model).
FULL_GRADS = [
    "visual.patch_embed.proj.weight",
    "visual.blocks.0.attn.qkv.weight",
    "visual.blocks.1.norm1.weight",
    "visual.merger.mlp.0.bias",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
]


def build_tiny(seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2]},
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        image_token_id=1023,
        video_token_id=1022,
        vision_start_token_id=1021,
        vision_end_token_id=1020,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # The default std 0.02 makes all logits nearly equal; 1/sqrt(fan_in) weights give a model whose
    # outputs depend clearly on every input, so a parity check has something to check.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p.numel() // p.shape[0]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def saved_name(name: str) -> str:
    """The name save_pretrained writes for an in-memory parameter name (transformers 5.x keeps
    `model.visual.*` / `model.language_model.*` in memory and writes the Hub layout)."""
    if name.startswith("model.visual."):
        return name.removeprefix("model.")
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    return name


def check_saved_names(model, ckpt: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(Path(ckpt) / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    mapped = {saved_name(n) for n, _ in model.named_parameters()}
    if not model.config.tie_word_embeddings:
        if mapped != keys:
            raise SystemExit(f"name mapping mismatch: {sorted(mapped ^ keys)}")
    elif not keys <= mapped:
        raise SystemExit(f"unexpected saved names: {sorted(keys - mapped)}")


def prompt(cfg, rng: torch.Generator):
    """A chat-like token sequence with two images, pads expanded to each image's token count."""
    merge = cfg.vision_config.spatial_merge_size
    grids = torch.tensor([[1, 10, 12], [1, 4, 6]])
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    vocab = cfg.text_config.vocab_size

    def text(n):
        ids = []
        while len(ids) < n:
            t = int(torch.randint(0, vocab, (1,), generator=rng))
            if t not in special:
                ids.append(t)
        return ids

    ids = text(7)
    for i, (t, h, w) in enumerate(grids.tolist()):
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // merge**2)
        ids += [cfg.vision_end_token_id] + text(5 + 2 * i)
    ids += text(6)
    return torch.tensor([ids]), grids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "burn")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    torch.set_grad_enabled(True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint or (SHARED_FIXTURE if (SHARED_FIXTURE / "config.json").exists() else None)
    if ckpt is not None:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager")
        print(f"loaded {ckpt}", file=sys.stderr)
    else:
        model = build_tiny(args.seed)
        ckpt = out / "tiny-hf"
        model.save_pretrained(ckpt, safe_serialization=True)
        print(f"built a tiny model, saved to {ckpt}", file=sys.stderr)
    model.config._attn_implementation = "eager"
    model.float().train(False)
    cfg = model.config
    vcfg = cfg.vision_config

    rng = torch.Generator().manual_seed(1234 + args.seed)
    input_ids, grids = prompt(cfg, rng)
    n_patches = int(grids.prod(-1).sum())
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    pixel_values = torch.randn(n_patches, patch_dim, generator=rng)
    mm = (input_ids == cfg.image_token_id).to(torch.int32)

    # transformers' helpers.
    pos_ids = get_vision_position_ids(grids, vcfg.spatial_merge_size)
    window_index, cu_window = get_vision_window_index(
        grids, spatial_merge_size=vcfg.spatial_merge_size, window_size=vcfg.window_size, patch_size=vcfg.patch_size
    )
    cu_full = get_vision_cu_seqlens(grids)
    position_ids, rope_deltas = model.model.get_rope_index(input_ids, mm_token_type_ids=mm, image_grid_thw=grids)

    with torch.no_grad():
        image_embeds = model.model.visual(pixel_values, grid_thw=grids).pooler_output
        model.model.rope_deltas = None
        logits = model(
            input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grids, mm_token_type_ids=mm
        ).logits.float()
        text_ids = torch.tensor([[int(t) for t in input_ids[0, :5]] + [int(t) for t in input_ids[0, -6:]]])
        model.model.rope_deltas = None
        text_logits = model(input_ids=text_ids).logits.float()

    # Gradient reference: L = sum_t w_t logp_t + 0.05 sum_t H_t over next-token predictions.
    s = input_ids.shape[1]
    w = torch.rand(s - 1, generator=rng) * 2 - 1
    model.zero_grad()
    model.model.rope_deltas = None
    lg = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grids, mm_token_type_ids=mm).logits[0]
    logp_all = torch.log_softmax(lg[:-1].float(), dim=-1)
    logp = logp_all.gather(1, input_ids[0, 1:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    # Image pads are not predicted tokens: the training forward scores only the others.
    scored = (input_ids[0, 1:] != cfg.image_token_id).float()
    loss = (scored * w * logp).sum() + 0.05 * (scored * entropy).sum()
    loss.backward()

    check_saved_names(model, Path(ckpt))
    grads = {}
    norm_names, norms = [], []
    for pname, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        hf = saved_name(pname)
        norm_names.append(hf)
        norms.append(float(g.double().norm()))
        if hf in FULL_GRADS:
            grads[f"grad.{hf}"] = g.detach().float().contiguous()

    tensors = {
        "input_ids": input_ids.to(torch.int64),
        "mm_token_type_ids": mm.to(torch.int64),
        "pixel_values": pixel_values.float().contiguous(),
        "image_grid_thw": grids.to(torch.int64),
        "vision_pos_ids": pos_ids.to(torch.int64).contiguous(),
        "window_index": window_index.to(torch.int64),
        "cu_window_seqlens": cu_window.to(torch.int64),
        "cu_seqlens": cu_full.to(torch.int64),
        "position_ids": position_ids.to(torch.int64).contiguous(),
        "rope_deltas": rope_deltas.to(torch.int64).reshape(-1),
        "image_embeds": image_embeds.float().contiguous(),
        "logits": logits.contiguous(),
        "text_input_ids": text_ids.to(torch.int64),
        "text_logits": text_logits.contiguous(),
        "grad_weights": w.float(),
        "grad_loss": torch.tensor([float(loss.detach())], dtype=torch.float32),
        "grad_norms": torch.tensor(norms, dtype=torch.float64),
        **grads,
    }
    try:
        rel = str(Path(ckpt).resolve().relative_to(ROOT))
    except ValueError:
        rel = str(Path(ckpt).resolve())
    meta = {"checkpoint": rel, "grad_names": ",".join(norm_names), "entropy_coef": "0.05"}
    save_file(tensors, str(out / "golden.safetensors"), metadata=meta)
    print(
        json.dumps(
            {
                "checkpoint": rel,
                "seq_len": s,
                "patches": n_patches,
                "params": len(norm_names),
                "loss": float(loss.detach()),
                "file_bytes": (out / "golden.safetensors").stat().st_size,
            }
        ),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
