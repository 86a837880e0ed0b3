#!/usr/bin/env python3
"""PEFT reference values for deepeyes' LoRA adapters, both directions.

    gen_lora_fixture.py [--out tests/data/lora]

Runs transformers' Qwen2_5_VLForConditionalGeneration on the shared tiny checkpoint
(tests/data/tiny-qwen2_5_vl/hf/) with PEFT adapters, on the burn golden set's two-image prompt
(tests/data/burn/golden.safetensors):

  * PEFT -> deepeyes: makes a LoRA adapter with PEFT (rank 4, alpha 8, target_modules
    ["q_proj", "v_proj", "qkv", "down_proj", "mlp.0"]: bare names that select layers of both the
    vision tower and the language model; init_lora_weights=False so that B is not zero) and saves
    it with save_pretrained to OUT/peft/. Records the adapted model's logits (peft_logits) and
    the gradient of every adapter tensor (peft_grad.<PEFT key>) of
    L = sum_t w_t logp_t + 0.05 sum_t H_t (the burn golden's weights and objective).
  * deepeyes -> PEFT: loads OUT/deepeyes/, the adapter deepeyes writes (deepeyes-rl's test
    `lora_fixture` regenerates it with DEEPEYES_WRITE_LORA_FIXTURE=1), with
    PeftModel.from_pretrained and records its logits (deepeyes_logits).

Writes OUT/golden.safetensors. CI needs no Python: deepeyes-rl/tests/lora.rs compares against
the committed files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "tests" / "data" / "tiny-qwen2_5_vl" / "hf"
PROMPT = ROOT / "tests" / "data" / "burn" / "golden.safetensors"
PEFT_TARGETS = ["q_proj", "v_proj", "qkv", "down_proj", "mlp.0"]


def base_model():
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(CHECKPOINT, attn_implementation="eager")
    model.config._attn_implementation = "eager"
    return model.float().train(False)


def forward(model, p):
    """Logits [seq, vocab] of the prompt and the golden objective L."""
    input_ids = p["input_ids"]
    logits = model(
        input_ids=input_ids,
        pixel_values=p["pixel_values"],
        image_grid_thw=p["image_grid_thw"],
        mm_token_type_ids=p["mm_token_type_ids"],
    ).logits[0].float()
    logp_all = torch.log_softmax(logits[:-1], dim=-1)
    logp = logp_all.gather(1, input_ids[0, 1:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    scored = (input_ids[0, 1:] != model.config.image_token_id).float()
    loss = (scored * p["grad_weights"] * logp).sum() + 0.05 * (scored * entropy).sum()
    return logits, loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "lora")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)

    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    g = load_file(str(PROMPT))
    prompt = {k: g[k] for k in ["input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids", "grad_weights"]}
    prompt["mm_token_type_ids"] = prompt["mm_token_type_ids"].to(torch.int32)

    # PEFT -> deepeyes.
    torch.manual_seed(args.seed)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PEFT_TARGETS, init_lora_weights=False
    )
    model = get_peft_model(base_model(), config)
    # A path that means something on any clone, not this machine's.
    model.peft_config["default"].base_model_name_or_path = "tests/data/tiny-qwen2_5_vl/hf"
    model.base_model.model.model.rope_deltas = None
    logits, loss = forward(model, prompt)
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default.weight", ".weight")
            grads[f"peft_grad.{key}"] = param.grad.detach().float().contiguous()
    model.save_pretrained(str(out / "peft"))
    (out / "peft" / "README.md").unlink(missing_ok=True)  # PEFT's model-card template
    saved = set(load_file(str(out / "peft" / "adapter_model.safetensors")).keys())
    missing = {k.removeprefix("peft_grad.") for k in grads} ^ saved
    if missing:
        raise SystemExit(f"gradient names and saved keys differ: {sorted(missing)[:4]}")
    tensors = {"peft_logits": logits.detach().contiguous(), "peft_loss": loss.detach().reshape(1), **grads}

    # deepeyes -> PEFT.
    ours = out / "deepeyes"
    if (ours / "adapter_config.json").is_file():
        with torch.no_grad():
            model = PeftModel.from_pretrained(base_model(), str(ours))
            model.base_model.model.model.rope_deltas = None
            logits, _ = forward(model, prompt)
        tensors["deepeyes_logits"] = logits.contiguous()
        adapted = sorted(n for n, _ in model.named_modules() if n.endswith(".lora_A"))
        print(f"deepeyes adapter: {len(adapted)} layers adapted by PEFT", file=sys.stderr)
    else:
        print(f"no {ours}: run deepeyes-rl's lora_fixture test with DEEPEYES_WRITE_LORA_FIXTURE=1 first", file=sys.stderr)

    save_file(tensors, str(out / "golden.safetensors"), metadata={"peft_targets": json.dumps(PEFT_TARGETS)})
    print(json.dumps({"tensors": len(tensors), "peft_loss": float(loss.detach())}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
