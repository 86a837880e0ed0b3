#!/usr/bin/env bash
# The tool-bonus ablations of the TinyEyes demo from the same base: DeepEyes' reward (the bonus
# paid only for a right answer whose trajectory got a crop back), no bonus (`--no-tool-bonus`)
# and an unconditional bonus (`--unconditional-tool-bonus`), each with seeds 0 and 1 (the seed
# draws the demo's data and its sampling), every one a full `deepeyes demo` run, two at a time on
# the machine's cores. Prints one table row per run: held-out greedy accuracy, calls per
# answer, zoom IoU, the steps at which the 5-step mean of training tool calls per trajectory
# passed 0.5 and 0.9, and training accuracy and IoU over the last 10 steps — then each reward's mean
# and spread over the seeds.
#
#   scripts/ablations.sh [OUT] [extra demo arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/ablations}
shift || true
bin=${DEEPEYES:-target/release/deepeyes}
mkdir -p "$out"
runs=()
for reward in conditional no-bonus unconditional; do
  for seed in 0 1; do runs+=("$reward-seed$seed"); done
done
flags_of() {
  case $1 in
    conditional-*) echo "--seed ${1##*seed}" ;;
    no-bonus-*) echo "--seed ${1##*seed} --no-tool-bonus" ;;
    unconditional-*) echo "--seed ${1##*seed} --unconditional-tool-bonus" ;;
  esac
}
pids=()
for run in "${runs[@]}"; do
  if [[ ! -f $out/$run/summary.json ]]; then
    # shellcheck disable=SC2046
    "$bin" demo --out "$out/$run" $(flags_of "$run") "$@" > "$out/$run.log" 2>&1 &
    pids+=($!)
    if (( ${#pids[@]} == 2 )); then wait "${pids[@]}"; pids=(); fi
  fi
done
(( ${#pids[@]} == 0 )) || wait "${pids[@]}"
python3 - "$out" "${runs[@]}" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], sys.argv[2:]
print(f"{'run':<22} {'accuracy':>8} {'calls':>6} {'IoU':>6} {'calls>0.5':>9} {'calls>0.9':>9} {'acc last 10':>11} {'IoU last 10':>11}")
by = {}
for run in runs:
    s = json.load(open(f"{out}/{run}/summary.json"))["trained"]
    rows = [json.loads(l) for l in open(f"{out}/{run}/train/metrics.jsonl")]
    calls = [r["tool_calls_mean"] for r in rows]
    def passed(th):
        return next((i + 5 for i in range(len(calls) - 4) if sum(calls[i:i + 5]) / 5 > th), None)
    tail = rows[-10:]
    acc = statistics.mean(r["accuracy"] for r in tail)
    iou = statistics.mean(r["grounding_iou"] for r in tail if r.get("grounding_iou") is not None)
    print(f"{run:<22} {s['accuracy']:8.3f} {s['tool_calls_per_answer']:6.2f} {s['zoom_iou'] or 0:6.3f} "
          f"{passed(0.5)!s:>9} {passed(0.9)!s:>9} {acc:11.3f} {iou:11.3f}")
    by.setdefault(run.rsplit("-seed", 1)[0], []).append(s["accuracy"])
for reward, accs in by.items():
    spread = (max(accs) - min(accs)) / 2
    print(f"{reward}: held-out accuracy {statistics.mean(accs):.3f} ± {spread:.3f} over {len(accs)} seeds")
PY
