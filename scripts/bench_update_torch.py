#!/usr/bin/env python3
"""The PyTorch side of the side-by-side update benchmark (scripts/bench_update.sh).

Reads the update the deepeyes side recorded (update-batch.safetensors / .json: the step's
trajectories with their preprocessed images, the per-token weights whose log-prob sum is the GRPO
surrogate, the micro-batches) and redoes it with transformers' Qwen2_5_VLForConditionalGeneration
loaded from the same bundle: for each micro-batch, forward (SDPA attention) to the final hidden
states, lm_head at the positions that predict a trained token, log-softmax, gather, backward of
sum(weights * logprobs); then the global gradient norm clipped and one AdamW step. Eager mode,
fp32, the given thread count. Prints one JSON line with the warm-up and measured times.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration


def micro_batch_inputs(tensors, meta, rows, merge=4):
    """Expanded input ids, attention mask, pixel values, grids and the scored picks of `rows`."""
    pad = meta["image_pad"]
    weights = tensors["weights"]
    engine = tensors["engine_logprobs"]
    ids, pixels, grids, picks = [], [], [], []
    for b, r in enumerate(rows):
        tokens = tensors[f"seq.{r}.tokens"].tolist()
        expanded, where, k = [], [], 0
        for t in tokens:
            if t == pad:
                grid = tensors[f"seq.{r}.image.{k}.grid"]
                pixels.append(tensors[f"seq.{r}.image.{k}.patches"])
                grids.append(grid)
                n = int(grid.prod().item()) // merge
                where.append(None)
                expanded.extend([pad] * n)
                k += 1
            else:
                where.append(len(expanded))
                expanded.append(t)
        ids.append(expanded)
        for t in range(1, len(tokens)):
            w = weights[r, t].item() if t < weights.shape[1] else 0.0
            if where[t] is not None and w != 0.0:
                picks.append((b, where[t] - 1, tokens[t], w, engine[r, t].item()))
    width = max(len(x) for x in ids)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, x in enumerate(ids):
        input_ids[b, : len(x)] = torch.tensor(x)
        mask[b, : len(x)] = 1
    pixel_values = torch.cat(pixels) if pixels else None
    grid_thw = torch.stack(grids) if grids else None
    # transformers computes multimodal (mRoPE) positions only when told which tokens are image
    # tokens (1), as its processor does; without them every position is a text position.
    token_types = (input_ids == pad).int()
    return input_ids, mask, pixel_values, grid_thw, token_types, picks


def model_gflop(model, batches):
    """Model FLOPs of one update (forward + backward = 3 x forward): the linear layers of the
    decoder and the vision tower per row they process, attention scores per sequence, the output
    head per scored position."""
    cfg = model.config.text_config
    vis = model.model.visual
    count = lambda m: sum(p.numel() for p in m.parameters())
    per_token = count(model.model.language_model.layers)
    per_patch = count(vis.patch_embed) + count(vis.blocks)
    per_merged = count(vis.merger)
    flops = 0
    for _, mask, pixels, _, _, picks in batches:
        lengths = mask.sum(dim=1).tolist()
        flops += 2 * per_token * sum(lengths)
        flops += sum(4 * n * n * cfg.hidden_size * cfg.num_hidden_layers for n in lengths)
        if pixels is not None:
            flops += 2 * per_patch * pixels.shape[0] + 2 * per_merged * pixels.shape[0] // 4
        flops += 2 * cfg.hidden_size * cfg.vocab_size * len(picks)
    return 3 * flops / 1e9


def update(model, optim, batches, grad_clip):
    """One update; returns the gradient norm before clipping and the largest difference between
    these log-probs and the deepeyes training engine's."""
    optim.zero_grad(set_to_none=True)
    worst = 0.0
    for input_ids, mask, pixel_values, grid_thw, token_types, picks in batches:
        out = model.model(
            input_ids=input_ids,
            attention_mask=mask,
            pixel_values=pixel_values,
            image_grid_thw=grid_thw,
            mm_token_type_ids=token_types,
        )
        hidden = out.last_hidden_state
        b = torch.tensor([p[0] for p in picks])
        e = torch.tensor([p[1] for p in picks])
        target = torch.tensor([p[2] for p in picks])
        w = torch.tensor([p[3] for p in picks])
        logp = torch.log_softmax(model.lm_head(hidden[b, e]), dim=-1)
        picked = logp.gather(1, target[:, None])[:, 0]
        theirs = torch.tensor([p[4] for p in picks])
        worst = max(worst, (picked.detach() - theirs).abs().max().item())
        (w * picked).sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optim.step()
    return norm.item(), worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--batch", required=True, help="folder with update-batch.*")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    folder = Path(a.batch)
    meta = json.loads((folder / "update-batch.json").read_text())
    tensors = load_file(str(folder / "update-batch.safetensors"))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        a.bundle, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.train()
    optim = torch.optim.AdamW(
        model.parameters(),
        lr=meta["lr"],
        betas=tuple(meta["betas"]),
        eps=meta["eps"],
        weight_decay=meta["weight_decay"],
    )
    times = []
    for run in range(a.runs + 1):
        t = time.perf_counter()
        # Building the inputs is part of the update on both sides.
        batches = [micro_batch_inputs(tensors, meta, rows) for rows in meta["micro_batches"]]
        norm, worst = update(model, optim, batches, meta["grad_clip"])
        s = time.perf_counter() - t
        if run == 0:
            first_grad_norm, first_worst = norm, worst
            print(f"pytorch log-probs vs deepeyes' training engine: max |diff| = {worst:.2e}")
        print(f"pytorch update {'(warm-up)' if run == 0 else f'run {run}'}: {s:.3f} s", flush=True)
        if run > 0:
            times.append(s)
    batches = [micro_batch_inputs(tensors, meta, rows) for rows in meta["micro_batches"]]
    print(
        json.dumps(
            {
                "update_s": times,
                "gflop": model_gflop(model, batches),
                "first_grad_norm": first_grad_norm,
                "max_logprob_diff": first_worst,
                "torch": torch.__version__,
                "threads": a.threads,
            }
        )
    )


if __name__ == "__main__":
    main()
