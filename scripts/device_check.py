#!/usr/bin/env python3
"""The PyTorch + PEFT side of the GPU check (scripts/device_check.sh), and the batch both sides use.

    device_check.py batch OUT.json --vocab V [--seqs N] [--len L] [--seed S]
    device_check.py torch MODEL BATCH.json [--rank R] [--runs N] [--device cuda]

`batch` writes a GRPO-shaped text batch: N sequences of L token ids, each scored from a quarter of
its length on, with one weight per scored token (the surrogate's coefficients: advantages over the
token count), as deepeyes-rl/examples/lora_update.rs reads it.

`torch` does what lora_update does, with transformers' Qwen2_5_VLForConditionalGeneration and PEFT:
adapters of rank R (alpha 2R) on every linear layer, the base frozen; per update, the forward to the
final hidden states (SDPA attention), the output head at the positions that predict a scored token,
log-softmax, gather, backward of sum(weights * logprobs), one AdamW step (lr 1e-5), the device
waited for. float32 like the deepeyes side. The first update warms up; the next N are timed. Prints
one JSON line with the times and torch's peak allocated memory.
"""

import argparse
import json
import random
import sys
import time


def write_batch(args) -> int:
    rng = random.Random(args.seed)
    sequences, score_from, weights = [], [], []
    for _ in range(args.seqs):
        sequences.append([rng.randrange(16, args.vocab) for _ in range(args.len)])
        score_from.append(args.len // 4)
        advantage = rng.uniform(-1.0, 1.0)
        weights.extend([advantage / (args.len - args.len // 4)] * (args.len - args.len // 4))
    with open(args.out, "w") as f:
        json.dump({"sequences": sequences, "score_from": score_from, "weights": weights}, f)
    return 0


def torch_update(args) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = torch.device(args.device)
    batch = json.load(open(args.batch))
    t0 = time.time()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    model = get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear")
    )
    load_s = time.time() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=1e-5)
    ids = torch.tensor(batch["sequences"], device=device)
    rows, cols, weights = [], [], []
    w = iter(batch["weights"])
    for b, (seq, start) in enumerate(zip(batch["sequences"], batch["score_from"])):
        for t in range(max(start, 1), len(seq)):
            rows.append(b)
            cols.append(t - 1)
            weights.append(next(w))
    rows = torch.tensor(rows, device=device)
    cols = torch.tensor(cols, device=device)
    targets = ids[rows, cols + 1]
    weights = torch.tensor(weights, device=device)
    base = model.base_model.model

    def update():
        start = time.time()
        hidden = base.model(input_ids=ids).last_hidden_state
        logits = base.lm_head(hidden[rows, cols])
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        loss = (weights * logp).sum()
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item(), time.time() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(args.runs + 1):
        loss, seconds = update()
        losses.append(loss)
        times.append(seconds)
    timed = sorted(times[1:])
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    print(
        json.dumps(
            {
                "side": "pytorch",
                "device": str(device),
                "load_s": load_s,
                "warmup_s": times[0],
                "median_s": timed[len(timed) // 2],
                "runs_s": times[1:],
                "first_loss": losses[0],
                "peak_allocated_mib": peak,
            }
        )
    )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("batch")
    b.add_argument("out")
    b.add_argument("--vocab", type=int, required=True)
    b.add_argument("--seqs", type=int, default=8)
    b.add_argument("--len", type=int, default=1024)
    b.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("torch")
    t.add_argument("model")
    t.add_argument("batch")
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--runs", type=int, default=3)
    t.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    return write_batch(args) if args.cmd == "batch" else torch_update(args)


if __name__ == "__main__":
    sys.exit(main())
