#!/usr/bin/env bash
# Installs the official `openai` Python SDK from PyPI into .venv-sdk/ at the repository root, for
# the test that drives `deepeyes serve` with it (deepeyes-cli/tests/serve_cli.rs). The product
# never needs Python; only that test does.
#
#   scripts/setup_openai_sdk.sh          # no-op once installed
#   OPENAI_SDK_VERSION=3.63.0 scripts/setup_openai_sdk.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-sdk"
version="${OPENAI_SDK_VERSION:-3.63.0}"
spec="openai${version:+==$version}"

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import openai' 2>/dev/null; then
    echo "$venv/bin/python"
    exit 0
fi
command -v python3 >/dev/null 2>&1 || {
    echo "setup_openai_sdk.sh: python3 is needed for the openai SDK test" >&2
    exit 1
}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$spec"
echo "$venv/bin/python"
