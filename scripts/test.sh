#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the ONNX Runtime library the ORT backend
# loads at run time (from the PyPI wheel, into .ort/) and the official `openai` Python SDK (into
# .venv-sdk/, for the test that drives `deepeyes serve` with it), then every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup_ort.sh
scripts/setup_openai_sdk.sh
cargo test --workspace "$@"
