#!/usr/bin/env bash
# The GPU check of the training engine, for a machine with one NVIDIA GPU, PyTorch, transformers,
# PEFT and the CUDA toolkit but no Rust toolchain and no network (the lent device). It makes a
# random-weight Qwen2.5-VL-3B at full depth with transformers, then runs one LoRA GRPO update on
# the same batch through deepeyes (burn's CUDA backend, the slim binary carried over) and through
# PyTorch + PEFT, and prints step time and peak GPU memory for both.
#
#   scripts/device_check.sh [--smoke] [BIN]
#
# BIN is the slim update binary (default ./lora_update), built on the development machine with
#   cargo build --release -p deepeyes-rl --features cuda --example lora_update
#   strip -o lora_update target/release/examples/lora_update
# --smoke: the 3B widths cut to 2 layers and 4 vision blocks, 2 sequences of 256 tokens (about a
# minute); otherwise full depth, 8 sequences of 1,024 tokens (about five minutes, of which the
# model's creation and CubeCL's first kernel compilations are a good part).
# The first step checks that the binary loads the CUDA libraries and runs a product.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false
if [[ "${1:-}" == "--smoke" ]]; then smoke=true; shift; fi
bin=${1:-./lora_update}
work=${DEVICE_CHECK_DIR:-/tmp/device-check}
mkdir -p "$work"

echo "== the binary runs on the GPU"
"$bin" --probe --device cuda

if $smoke; then preset=3b-width seqs=2 len=256; else preset=3b seqs=8 len=1024; fi
if [[ ! -f "$work/$preset/hf/config.json" ]]; then
    echo "== random Qwen2.5-VL ($preset) with transformers"
    python3 scripts/make_random_qwen2_5_vl.py --preset "$preset" "$work/$preset" --device cuda --dtype bfloat16
fi
python3 scripts/device_check.py batch "$work/batch.json" --vocab 151936 --seqs "$seqs" --len "$len"

# Peak GPU memory of a command, from nvidia-smi every 0.1 s (the same measure for both sides:
# what the process holds on the device, allocator caches included).
peak_of() {
    local log=$1; shift
    "$@" >"$log" &
    local pid=$! peak=0 used
    while kill -0 "$pid" 2>/dev/null; do
        used=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits |
            awk -F', ' -v p="$pid" '$1 == p { print $2 }')
        if [[ -n "$used" && "$used" -gt "$peak" ]]; then peak=$used; fi
        sleep 0.1
    done
    wait "$pid"
    echo "$peak"
}

echo "== deepeyes (burn, CUDA)"
ours_peak=$(peak_of "$work/deepeyes.json" "$bin" "$work/$preset/hf" "$work/batch.json" --device cuda --rank 16 --runs 3)
cat "$work/deepeyes.json"
echo "== PyTorch + PEFT"
torch_peak=$(peak_of "$work/pytorch.json" python3 scripts/device_check.py torch "$work/$preset/hf" "$work/batch.json" --rank 16 --runs 3)
cat "$work/pytorch.json"

python3 - "$work/deepeyes.json" "$work/pytorch.json" "$ours_peak" "$torch_peak" <<'EOF'
import json, sys
ours, torch = (json.load(open(p)) for p in sys.argv[1:3])
ours_peak, torch_peak = (int(v) for v in sys.argv[3:5])
print(f"step time   deepeyes {ours['median_s']:.3f} s   pytorch {torch['median_s']:.3f} s   "
      f"ratio (pytorch / deepeyes) {torch['median_s'] / ours['median_s']:.2f}")
print(f"peak GPU    deepeyes {ours_peak} MiB   pytorch {torch_peak} MiB (nvidia-smi)")
print(f"first loss  deepeyes {ours['first_loss']:.6e}   pytorch {torch['first_loss']:.6e}   "
      f"relative difference {abs(ours['first_loss'] - torch['first_loss']) / abs(torch['first_loss']):.1e}")
EOF
