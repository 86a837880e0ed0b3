#!/usr/bin/env bash
# Measures the peak resident memory (VmHWM) of streaming verl parquet files of 1× and 10× size
# with deepeyes_core::dataset::VerlParquetReader, and prints a Markdown table.
#
#   scripts/measure_dataset_memory.sh            # 200 rows / 2000 rows of 256×256 noise PNGs
#   ROWS=100 SIDE=512 scripts/measure_dataset_memory.sh
#
# The files are generated into a temporary folder (removed afterwards) by the
# `dataset_memory` example; each measurement is a separate process. The figures in
# docs/DATASETS.md come from this script.
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-200}          # rows of the 1× file
SIDE=${SIDE:-256}          # image side in pixels (a noise PNG is ~SIDE²×3 bytes)
ROW_GROUP=${ROW_GROUP:-64} # rows per row group
PROFILE=${PROFILE:-release}

profile_flag=()
profile_dir=debug
if [[ "$PROFILE" == release ]]; then
    profile_flag=(--release)
    profile_dir=release
fi
cargo build -q -p deepeyes-core --example dataset_memory --no-default-features \
    --features parquet "${profile_flag[@]}"
bin="${CARGO_TARGET_DIR:-target}/$profile_dir/examples/dataset_memory"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$bin" write "$tmp/x1.parquet" --rows "$ROWS" --side "$SIDE" --row-group "$ROW_GROUP" >/dev/null
"$bin" write "$tmp/x10.parquet" --rows $((ROWS * 10)) --side "$SIDE" --row-group "$ROW_GROUP" \
    >/dev/null

# The same rows rewritten by pyarrow with its defaults (as HF `datasets` and verl's own scripts
# write parquet): 100-row row groups, and pages that hold a whole row group's images.
PYTHON=${PYTHON:-.venv/bin/python}
if [[ -x "$PYTHON" ]] && "$PYTHON" -c "import pyarrow" 2>/dev/null; then
    for f in x1 x10; do
        "$PYTHON" -c "import sys, pyarrow.parquet as pq
pq.write_table(pq.read_table(sys.argv[1]), sys.argv[2], row_group_size=100)" \
            "$tmp/$f.parquet" "$tmp/$f-pyarrow.parquet"
    done
fi

field() { sed -E "s/.*\"$1\": \"?([^,\"}]*).*/\1/" <<<"$2"; }

row() { # file check batch
    local out size rss
    out=$("$bin" stream "$tmp/$1.parquet" --check "$2" --batch-rows "$3")
    size=$(field file_bytes "$out")
    rss=$(field peak_rss_kib "$out")
    printf '| %s | %.0f | %s | %s | %s | %.1f | %s |\n' "$1" \
        "$(echo "$size / 1000000" | bc -l)" "$(field items "$out")" "$2" "$3" \
        "$(echo "$rss / 1024" | bc -l)" "$(field seconds "$out")"
}

echo "| file | size (MB) | rows | image check | batch rows | peak RSS (MiB) | time (s) |"
echo "| --- | ---: | ---: | --- | ---: | ---: | ---: |"
for f in x1 x10; do
    for check in header decode; do
        for batch in 8 64; do
            row "$f" "$check" "$batch"
        done
    done
done
for f in x1-pyarrow x10-pyarrow; do
    if [[ -f "$tmp/$f.parquet" ]]; then
        row "$f" header 8
    fi
done
