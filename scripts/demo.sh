#!/usr/bin/env bash
# The main job on a fresh machine: installs the ONNX Runtime library the ORT backend loads at run
# time (from the PyPI wheel, into .ort/), then runs `deepeyes demo` on the embedded TinyEyes model:
# base evaluation, GRPO on SynthV* with a live table, trained evaluation, curves and one traced
# episode, all under runs/demo/. Extra arguments go to `deepeyes demo` (e.g. --steps 60).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup_ort.sh
# The demo reads no parquet files: building without that feature shortens the first wait
# (docs/BUILD.md). `cargo build --release -p deepeyes-cli` builds the full binary.
cargo run --release -p deepeyes-cli --no-default-features -- demo "$@"
