#!/usr/bin/env bash
# Sizes the default pre-training recipe: for each candidate (a set of --set overrides), time a
# few steps, give it as many steps as fit into BUDGET seconds of training, run it, and print the
# final validation bits per byte (which compares across vocabularies) and wall time.
#
#   scripts/recipe_candidates.sh [BUDGET_SECONDS]      (default 450: ~8 minutes with set-up)
#
# Edit the candidates below; results of the runs that sized today's default: docs/pretraining.md.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-450}
bin=target/release/lmforge
work=${WORK:-runs/recipe-candidates}
mkdir -p "$work"
candidates=(
    "c1 --set model.n_layer=4 --set model.d_model=192 --set model.n_head=4 --set tokenizer.vocab_size=2048 --set train.lr=3e-3 --set train.min_lr=3e-4"
    "c2 --set model.n_layer=4 --set model.d_model=256 --set model.n_head=4 --set tokenizer.vocab_size=2048 --set train.lr=2e-3 --set train.min_lr=2e-4"
    "c3 --set model.n_layer=6 --set model.d_model=256 --set model.n_head=4 --set tokenizer.vocab_size=4096 --set train.lr=2e-3 --set train.min_lr=2e-4"
)
for c in "${candidates[@]}"; do
    read -r name flags <<< "$c"
    # shellcheck disable=SC2086
    "$bin" pretrain --quiet --out "$work/$name-probe" --max-steps 12 --set train.eval_every=0 $flags > /dev/null 2>&1
    step_s=$(python3 -c "
import json,statistics,sys
e=[json.loads(l)['elapsed_s'] for l in open('$work/$name-probe/metrics.jsonl') if '\"loss\"' in l]
print(statistics.median([b-a for a,b in zip(e,e[1:])][2:]))")
    steps=$(python3 -c "print(int($budget / $step_s) // 10 * 10)")
    t0=$(date +%s)
    # shellcheck disable=SC2086
    "$bin" pretrain --quiet --out "$work/$name" --max-steps "$steps" $flags > "$work/$name.log" 2>&1
    t1=$(date +%s)
    python3 - "$work/$name" "$name" "$steps" "$((t1 - t0))" "$step_s" <<'PY'
import json, sys
run, name, steps, wall, step_s = sys.argv[1:]
ev = [json.loads(l) for l in open(run + "/metrics.jsonl") if "val_bits_per_byte" in l]
v = ev[-1]
print(f"{name}: {steps} steps ({float(step_s)*1e3:.0f} ms/step), wall {wall} s, "
      f"val loss {v['val_loss']:.4f}, ppl {v['val_ppl']:.1f}, bits/byte {v['val_bits_per_byte']:.4f}")
PY
done
