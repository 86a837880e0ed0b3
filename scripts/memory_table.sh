#!/usr/bin/env bash
# The activation-memory table of docs/LORA.md: peak memory of one LoRA update (rank 16, every
# linear layer) by sequence length, burn's gradient checkpointing off and on, each run in its own
# process (deepeyes-rl/examples/activation_memory.rs), plus the engine before chunked attention
# and chunked logits (--whole) at the lengths this machine holds.
#
#   scripts/memory_table.sh MODEL [LENGTHS] [WHOLE_LENGTHS]
#
# MODEL: a checkpoint directory, e.g. from
#   python3 scripts/make_random_qwen2_5_vl.py --preset 3b-width /tmp/q3b   (MODEL=/tmp/q3b/hf)
# LENGTHS defaults to "1024 2048 4096 8192", WHOLE_LENGTHS to "1024 2048".
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/memory_table.sh MODEL [LENGTHS] [WHOLE_LENGTHS]}
lengths=${2:-1024 2048 4096 8192}
whole_lengths=${3:-1024 2048}
cargo build --release -p deepeyes-rl --example activation_memory
bin=target/release/examples/activation_memory
echo "| tokens | checkpointing | attention, logits | resident MiB | activation MiB | peak MiB | update s |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
row() {
    "$bin" "$model" "$@" --lora 16 | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
cells = [
    "{:,}".format(r["tokens"]),
    "on" if r["checkpointing"] else "off",
    "chunked" if r["chunked"] else "whole",
    "{:,.0f}".format(r["resident_mib"]),
    "{:,.0f}".format(r["activation_mib"]),
    "{:,.0f}".format(r["peak_mib"]),
    str(r["update_s"]),
]
print("| " + " | ".join(cells) + " |")'
}
for len in $lengths; do
    for ckpt in off on; do row "$len" "$ckpt"; done
done
for len in $whole_lengths; do
    for ckpt in off on; do row "$len" "$ckpt" --whole; done
done
