#!/usr/bin/env bash
# The GRPO update of deepeyes against eager PyTorch, side by side on the same work: one rollout
# step of the demo's configuration (8 SynthV* prompts × 16 samples) with BUNDLE, then the
# trainer's real update half on those rollouts (deepeyes-rl/benches/update_vs_pytorch.rs) and
# transformers' Qwen2.5-VL redoing the same update from the same weights, rows, images and
# per-token weights (scripts/bench_update_torch.py), each warmed up once and timed RUNS times
# with the same thread count. Prints both medians, the ratio and the GFLOP/s each side reaches.
#
#   scripts/bench_update.sh [--bundle DIR] [--runs N] [--threads N]
#
# The demo's late shape (one crop per answer) comes from its trained bundle:
#   scripts/bench_update.sh --bundle runs/demo/train/final
# Needs Python with torch and transformers (scripts/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

bundle=assets/tinyeyes
runs=3
threads=2
out=target/bench-update
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) bundle=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

scripts/setup_ort.sh
# cargo runs benches from their package folder.
bundle=$(realpath "$bundle")
mkdir -p "$out"
out=$(realpath "$out")
export RAYON_NUM_THREADS=$threads
for mode in "" --same-work; do
    cargo bench --workspace --bench update_vs_pytorch -- \
        --bundle "$bundle" --out "$out" --runs "$runs" --threads "$threads" $mode
done
python3 scripts/bench_update_torch.py --bundle "$bundle" --batch "$out" --runs "$runs" \
    --threads "$threads" | tee "$out/pytorch.log"
python3 - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
ours = json.loads((out / "deepeyes-times.json").read_text())
same = json.loads((out / "deepeyes-same-work.json").read_text())
theirs = json.loads((out / "pytorch.log").read_text().strip().splitlines()[-1])
d, s, p = (statistics.median(x["update_s"]) for x in (ours, same, theirs))
gflop = theirs["gflop"]
print(f"\nwork: {gflop:.1f} GFLOP per update (model FLOPs of the full rows, forward + backward;")
print("GFLOP/s below is that figure over each time, so shared prefixes count as if computed)")
print(f"deepeyes, end to end  median {d:.3f} s  {gflop / d:6.1f} GFLOP/s  runs {ours['update_s']}")
print(f"deepeyes, same work   median {s:.3f} s  {gflop / s:6.1f} GFLOP/s  runs {same['update_s']}")
print(f"pytorch               median {p:.3f} s  {gflop / p:6.1f} GFLOP/s  runs {theirs['update_s']}")
print(f"ratio end to end (pytorch time / deepeyes time, > 1: deepeyes faster): {p / d:.2f}")
print(f"ratio same work: {p / s:.2f}")
# Both sides' first update starts from the bundle's weights: the same work gives the same gradient.
a, b = ours["first_grad_norm"], theirs["first_grad_norm"]
print(f"first gradient norm: deepeyes {a:.6e}, pytorch {b:.6e} (relative difference {abs(a - b) / b:.1e})")
print(f"largest log-prob difference of the two engines: {theirs['max_logprob_diff']:.1e}")
PY
