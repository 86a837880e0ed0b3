#!/usr/bin/env bash
# Peak resident memory (max RSS) of `deepeyes train` over SynthV* training sets of N and 10×N
# items, with the data window the trainer holds (`data.window`), and prints a Markdown table.
#
#   scripts/measure_train_memory.sh                    # N = 200, window 64, 3 steps
#   N=100 WINDOW=32 STEPS=2 scripts/measure_train_memory.sh
#   WINDOW=100000 scripts/measure_train_memory.sh      # a window larger than the data: all held
#
# Each run is a separate process on the demo's TinyEyes config (smaller groups, so it is quick);
# the data is generated into a temporary folder, removed afterwards. The figures in
# docs/DATASETS.md come from this script.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-200}
WINDOW=${WINDOW:-64}
STEPS=${STEPS:-3}
PROFILE=${PROFILE:-release}

profile_flag=()
profile_dir=debug
if [[ "$PROFILE" == release ]]; then
    profile_flag=(--release)
    profile_dir=release
fi
scripts/setup_ort.sh >/dev/null
cargo build -q --workspace --bins "${profile_flag[@]}"
bin="${CARGO_TARGET_DIR:-target}/$profile_dir/deepeyes"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "| training items | data on disk | window | steps | peak RSS |"
echo "| ---: | ---: | ---: | ---: | ---: |"
for items in "$N" $((N * 10)); do
    "$bin" synthv --out "$tmp/data-$items" --train "$items" --test 1 >/dev/null 2>&1
    sed -e "s|^output-dir = .*|output-dir = \"$tmp/run-$items\"|" \
        -e "s|^steps = .*|steps = $STEPS|" \
        -e "s|^paths = .*|paths = [\"$tmp/data-$items/train.jsonl\"]\nwindow = $WINDOW|" \
        -e "s|^group-size = .*|group-size = 4|" \
        -e "s|^bundle = .*|bundle = \"$PWD/assets/tinyeyes\"|" \
        configs/train/tinyeyes-demo.toml >"$tmp/train-$items.toml"
    if ! /usr/bin/time -f "%M" -o "$tmp/peak-$items" "$bin" train \
        --config "$tmp/train-$items.toml" >/dev/null 2>"$tmp/train-$items.log"; then
        cat "$tmp/train-$items.log" >&2
        exit 1
    fi
    peak_kib=$(tail -n 1 "$tmp/peak-$items")
    disk=$(du -sh "$tmp/data-$items" | cut -f1)
    printf "| %d | %s | %d | %d | %.0f MiB |\n" "$items" "$disk" "$WINDOW" "$STEPS" \
        "$(echo "$peak_kib / 1024" | bc -l)"
done
