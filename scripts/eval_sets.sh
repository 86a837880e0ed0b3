#!/usr/bin/env bash
# TinyEyes' held-out sets, greedy, for one or more bundles: 200 items each of 1024 × 1024 (the
# default SynthV*), 640 × 640, 1536 × 768, 768 × 1536 and the search variant (3–5 decoys),
# drawn from seed 0 (`deepeyes synthv --config configs/synthv/…`), each evaluated under the
# bundle's own agent limits (agent.toml) and tools (tools.toml). Prints one line per bundle and
# set: accuracy, calls, valid crops, zoom IoU, answers and accuracy by the number of looks, and
# how often the policy looked again after a first look that hit or missed the card.
#
#   scripts/eval_sets.sh OUT BUNDLE...
#
# Sets are written once under OUT/sets; evaluations go to OUT/<bundle name>/<set>.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/eval_sets.sh OUT BUNDLE...}
shift
bin=${DEEPEYES:-target/release/deepeyes}
declare -A configs=(
  [square-1024]=""
  [square-640]=configs/synthv/square-640.toml
  [wide-1536x768]=configs/synthv/wide-1536x768.toml
  [tall-768x1536]=configs/synthv/tall-768x1536.toml
  [search]=configs/synthv/search.toml
)
sets=(square-1024 square-640 wide-1536x768 tall-768x1536 search)
for set in "${sets[@]}"; do
  if [[ ! -f $out/sets/$set/test.jsonl ]]; then
    cfg=${configs[$set]}
    "$bin" synthv --out "$out/sets/$set" --train 0 --test 200 --seed 0 ${cfg:+--config "$cfg"} >/dev/null
  fi
done
printf '%-44s %-14s %9s %13s %12s %9s %s\n' bundle set accuracy calls/answer "valid crops" "zoom IoU" "looks (answers, accuracy); look again after hit / miss"
for bundle in "$@"; do
  name=${bundle//\//_}
  name=${name#_}
  for set in "${sets[@]}"; do
    dir=$out/$name/$set
    "$bin" eval --model "$bundle" --bench synthv --data "$out/sets/$set/test.jsonl" --out "$dir" \
      --threads 1 --batch 8 -q >/dev/null
    python3 - "$dir/summary.json" "$name" "$set" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); t = s["tools"]
f = lambda v: "-" if v is None else f"{v:.3f}"
looks = " ".join(f"{l['looks']}:{l['answers']},{l['accuracy']:.2f}" for l in t.get("by_looks", []))
print(f"{sys.argv[2]:<44} {sys.argv[3]:<14} {s['overall']:9.3f} {t['calls_per_sample']:13.2f} "
      f"{f(t['valid_crop_rate']):>12} {f(t['mean_iou']):>9} {looks}; "
      f"{f(t.get('look_again_after_hit'))} / {f(t.get('look_again_after_miss'))}")
PY
  done
done
