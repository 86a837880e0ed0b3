#!/usr/bin/env bash
# Fills a project-local directory with the ONNX Runtime shared library that deepeyes loads at run
# time, taken from the PyPI `onnxruntime` wheel (CPU build). No Python environment is needed: pip
# only downloads the wheel, and the library is unzipped from it.
#
#   scripts/setup_ort.sh            # installs into .ort/ at the repository root
#   ORT_DIR=/some/dir scripts/setup_ort.sh
#   ORT_VERSION=1.32.0 scripts/setup_ort.sh
#   ORT_PACKAGE=onnxruntime-gpu ORT_VERSION=1.31.1 scripts/setup_ort.sh   # CUDA 13 / cuDNN 9 build
#
# Running it again is a no-op once the library is in place. deepeyes finds the library in this
# order: $ORT_DYLIB_PATH, this directory, then the onnxruntime package of `python3`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${ORT_VERSION:-1.32.0}"
package="${ORT_PACKAGE:-onnxruntime}"
dest="${ORT_DIR:-$root/.ort}"
lib="$dest/libonnxruntime.so.$version"

if [[ "$(uname -s)" != "Linux" ]]; then
    echo "setup_ort.sh: only Linux is handled; set ORT_DYLIB_PATH to your onnxruntime library instead" >&2
    exit 1
fi
case "$(uname -m)" in
    x86_64) platform="manylinux_2_28_x86_64" ;;
    aarch64) platform="manylinux_2_28_aarch64" ;;
    *) echo "setup_ort.sh: no onnxruntime wheel for $(uname -m)" >&2; exit 1 ;;
esac

if [[ -f "$lib" && -L "$dest/libonnxruntime.so" ]]; then
    echo "$lib"
    exit 0
fi

pip_cmd=()
if command -v pip3 >/dev/null 2>&1; then
    pip_cmd=(pip3)
elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    pip_cmd=(python3 -m pip)
else
    echo "setup_ort.sh: pip is needed to download the $package wheel" >&2
    exit 1
fi
command -v unzip >/dev/null 2>&1 || python3 -c 'import zipfile' 2>/dev/null || {
    echo "setup_ort.sh: unzip (or python3) is needed to unpack the wheel" >&2
    exit 1
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${pip_cmd[@]}" download --quiet --no-deps --only-binary=:all: \
    --python-version 3.11 --platform "$platform" \
    --dest "$tmp" "$package==$version"
wheel="$(ls "$tmp"/*.whl)"

mkdir -p "$dest"
members=("onnxruntime/capi/libonnxruntime.so.$version")
if [[ "$package" == "onnxruntime-gpu" ]]; then
    members+=("onnxruntime/capi/libonnxruntime_providers_shared.so"
              "onnxruntime/capi/libonnxruntime_providers_cuda.so")
fi
if command -v unzip >/dev/null 2>&1; then
    unzip -q -o -j "$wheel" "${members[@]}" -d "$tmp/lib"
else
    python3 - "$wheel" "$tmp/lib" "${members[@]}" <<'PY'
import os, sys, zipfile
wheel, out, *members = sys.argv[1:]
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for m in members:
        with open(os.path.join(out, os.path.basename(m)), "wb") as f:
            f.write(z.read(m))
PY
fi
# Move into place atomically so a concurrent run never sees a half-written library.
for f in "$tmp"/lib/*; do
    mv -f "$f" "$dest/.$(basename "$f").tmp"
    mv -f "$dest/.$(basename "$f").tmp" "$dest/$(basename "$f")"
done
ln -sfn "libonnxruntime.so.$version" "$dest/libonnxruntime.so"
echo "$lib"
