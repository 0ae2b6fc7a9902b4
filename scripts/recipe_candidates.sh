#!/usr/bin/env bash
# Sizes the default pre-training recipe: runs each candidate (a step count and flags over the
# built-in defaults) and prints its wall time and final validation bits per byte (which compares
# across vocabularies). The runs of 2026-11-30 that chose today's default: docs/pretraining.md.
#
#   scripts/recipe_candidates.sh [NAME...]        (default: all; each takes ~6–9 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/lmforge
work=${WORK:-runs/recipe-candidates}
mkdir -p "$work"
declare -A candidates=(
    [c1]="830 --arch gpt2 --n-layer 4 --d-model 192 --n-head 4 --vocab-size 2048 --lr 3e-3 --min-lr 3e-4"
    [c2]="710 --arch gpt2 --n-layer 4 --d-model 256 --n-head 4 --vocab-size 2048 --lr 2e-3 --min-lr 2e-4"
    [c4]="1050 --arch gpt2 --n-layer 4 --d-model 192 --n-head 4 --vocab-size 2048 --lr 3e-3 --min-lr 3e-4"
    [c5]="1050 --arch llama --n-layer 4 --d-model 192 --n-head 4 --vocab-size 2048 --lr 3e-3 --min-lr 3e-4"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(c1 c2 c4 c5)
for name in "${names[@]}"; do
    read -r steps flags <<< "${candidates[$name]}"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    "$bin" pretrain --quiet --out "$work/$name" --max-steps "$steps" $flags > "$work/$name.log" 2>&1
    t1=$(date +%s)
    python3 - "$work/$name" "$name" "$steps" "$((t1 - t0))" <<'PY'
import json, sys
run, name, steps, wall = sys.argv[1:]
v = [json.loads(l) for l in open(run + "/metrics.jsonl") if "val_bits_per_byte" in l][-1]
print(f"{name}: {steps} steps, wall {wall} s, val loss {v['val_loss']:.4f}, "
      f"ppl {v['val_ppl']:.1f}, bits/byte {v['val_bits_per_byte']:.4f}")
PY
done
