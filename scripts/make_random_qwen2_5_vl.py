#!/usr/bin/env python3
"""Random-weight Qwen2.5-VL reference models at real widths, with transformers (the one script
for them; the engine benchmarks and the LoRA work use it).

    make_random_qwen2_5_vl.py --preset 3b-width OUT_DIR [--seed S] [--bundle] [--threads N]
                              [--dtype float32|bfloat16] [--device cpu|cuda]

writes OUT_DIR/hf, a Hugging Face checkpoint of a Qwen2_5_VLForConditionalGeneration with the
preset's widths and random weights (loadable with from_pretrained, by deepeyes'
`Qwen25Vl::from_pretrained` too), with the small byte-level BPE tokenizer of the tiny test model
(its special-token ids are below any real vocabulary; the embedding table still has the preset's
vocabulary size). With --bundle it also exports OUT_DIR/bundle with scripts/export_qwen2_5_vl.py
(weights in <graph>.onnx.data files above 1.5 GB; the export's own ONNX Runtime check is skipped:
it would hold the model three times).

Presets (the -width ones cut in depth so that a 2-core machine can hold and run them; widths
are the real ones):
    3b-width   Qwen2.5-VL-3B widths: hidden 2048, 16 heads, 2 KV heads, intermediate 11008,
               vocab 151936, vision width 1280 (16 heads, intermediate 3420, output 2048);
               2 text layers, 4 vision blocks (the last with full attention).
    7b-width   Qwen2.5-VL-7B widths: hidden 3584, 28 heads, 4 KV heads, intermediate 18944,
               vocab 152064, vision width 1280 (output 3584); 2 text layers, 4 vision blocks.
    3b, 7b     full depth (36 / 28 text layers, 32 vision blocks with full attention in blocks
               7, 15, 23, 31), for a GPU machine (scripts/device_check.sh): --device cuda builds
               there, --dtype bfloat16 halves the files. The output head is untied in every preset.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_qwen2_5_vl as export  # noqa: E402

WIDTHS_3B = dict(hidden=2048, heads=16, kv_heads=2, intermediate=11008, vocab=151936, out=2048)
WIDTHS_7B = dict(hidden=3584, heads=28, kv_heads=4, intermediate=18944, vocab=152064, out=3584)
CUT = dict(layers=2, vision_depth=4, fullatt=[3])
FULL_VISION = dict(vision_depth=32, fullatt=[7, 15, 23, 31])
PRESETS = {
    "3b-width": {**WIDTHS_3B, **CUT},
    "7b-width": {**WIDTHS_7B, **CUT},
    "3b": {**WIDTHS_3B, "layers": 36, **FULL_VISION},
    "7b": {**WIDTHS_7B, "layers": 28, **FULL_VISION},
}


def build(preset: str, seed: int):
    p = PRESETS[preset]
    tok = export.build_tokenizer(1024, seed)
    half = p["hidden"] // p["heads"] // 2
    text = dict(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        # Qwen2.5-VL's split of the rotary half: 16 temporal, 24 height, 24 width for head_dim 128.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [half // 4, (half - half // 4) // 2, (half - half // 4) // 2],
        },
    )
    vision = dict(
        depth=p["vision_depth"],
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=p["out"],
        fullatt_block_indexes=p["fullatt"],
    )
    return export.random_model(tok, text, vision, seed), tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", metavar="OUT_DIR")
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", action="store_true", help="also export OUT_DIR/bundle")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="of the saved weights")
    ap.add_argument("--device", default="cpu", help="where the weights are drawn (cuda is faster)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.time()
    with torch.device(args.device):
        model, tok = build(args.preset, args.seed)
    model = model.to(getattr(torch, args.dtype))
    params = sum(p.numel() for p in model.parameters())
    export.log(f"built {args.preset} ({params / 1e6:.0f} M parameters) in {time.time() - t0:.1f} s")
    export.save_hf(model, tok, out / "hf")
    export.log(f"wrote {out / 'hf'}")
    if args.bundle:
        export.write_bundle(model, out / "hf", out / "bundle", external=params * 4 > 1_500_000_000)
        export.log(f"wrote {out / 'bundle'} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
