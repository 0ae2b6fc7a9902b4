#!/usr/bin/env bash
# A/B of two lmforge builds on the training engine's step: `pretrain` (the pre-engine default
# model: gpt2, 4 layers, d=192, 16×128 tokens per step) and `sft` (a 6-layer d=384 gpt2 base on
# data/sft/shakespeare-qa.jsonl, 8 examples per step), alternating which build goes first.
# Prints each run's median step time and the median of the paired ratios (old/new step time:
# > 1 means the new build is faster).
#
#   scripts/bench_engine_ab.sh OLD_BINARY NEW_BINARY [ROUNDS]
#
# OLD_BINARY may predate the engine (2026-11-30): its pretrain recipe format is detected from
# `pretrain --help` (no --seq-len flag = the old recipe format).
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?old binary}; new=${2:?new binary}; rounds=${3:-10}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
steps=40; sft_steps=15

cfg_for() {  # $1 binary → a recipe file it reads
    if "$1" pretrain --help | grep -q -- '--seq-len'; then
        cat > "$work/new.toml" <<TOML
[model]
arch = "gpt2"
n_layer = 4
n_head = 4
d_model = 192
ctx = 128
[tokenizer]
vocab_size = 2048
[data]
seq_len = 128
[train]
max_steps = $steps
batch_size = 16
checkpoint_every = 0
eval_every = 0
TOML
        echo "$work/new.toml"
    else
        git show be586d7:configs/shakespeare-gpt.toml | sed -e "s/^max_steps = .*/max_steps = $steps/" \
            -e 's/^checkpoint_every = .*/checkpoint_every = 0/' \
            -e 's#^paths = .*#paths = ["'"$PWD"'/data/shakespeare"]#' > "$work/old.toml"
        echo "$work/old.toml"
    fi
}

# median step seconds of a run directory's metrics (steps 2..): "elapsed" = differences of the
# cumulative elapsed_s (pretrain: both builds log it), "step" = the logged step_s (sft: the old
# build logs only that; both time batch building, forward, backward and the update)
med() {
    python3 - "$1" "$2" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
rows = [r for r in rows if "step" in r and "loss" in r]
if sys.argv[2] == "step":
    t = [r["step_s"] for r in rows[1:]]
else:
    e = [r["elapsed_s"] for r in rows]
    t = [b - a for a, b in zip(e, e[1:])]
print(f"{statistics.median(t):.5f}")
PY
}

# an SFT base model, written once by the new build
"$new" pretrain --quiet --out "$work/base" --max-steps 1 --n-layer 6 --n-head 6 --d-model 384 \
    --ctx 256 --seq-len 256 --vocab-size 4096 --batch-size 2 > /dev/null 2>&1
old_cfg=$(cfg_for "$old"); new_cfg=$(cfg_for "$new")
log=$work/log
for r in $(seq 1 "$rounds"); do
    order=(old new); [ $((r % 2)) -eq 0 ] && order=(new old)
    for side in "${order[@]}"; do
        if [ "$side" = old ]; then bin=$old; cfg=$old_cfg; else bin=$new; cfg=$new_cfg; fi
        rm -rf "$work/pt-$side" "$work/sft-$side"  # a fresh run each round (lmforge refuses to start over in an old one)
        "$bin" pretrain --quiet --config "$cfg" --out "$work/pt-$side" > /dev/null 2>&1
        p=$(med "$work/pt-$side" elapsed)
        "$bin" sft --quiet --model "$work/base/model" --data data/sft/shakespeare-qa.jsonl \
            --max-steps $sft_steps --batch-size 8 --out "$work/sft-$side" > /dev/null 2>&1
        s=$(med "$work/sft-$side" step)
        echo "$r $side $p $s" | tee -a "$log"
    done
done
python3 - "$log" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    r, side, p, s = line.split()
    runs.setdefault(r, {})[side] = (float(p), float(s))
for i, name in enumerate(["pretrain", "sft"]):
    ratios = [v["old"][i] / v["new"][i] for v in runs.values() if "old" in v and "new" in v]
    old = statistics.median(v["old"][i] for v in runs.values())
    new = statistics.median(v["new"][i] for v in runs.values())
    print(f"{name}: median step old {old*1e3:.1f} ms, new {new*1e3:.1f} ms; "
          f"median paired ratio old/new {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} rounds)")
PY
