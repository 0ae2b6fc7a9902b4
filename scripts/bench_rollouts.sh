#!/usr/bin/env bash
# Batched decoding throughput (new tokens/s at batch 1, 8, 32): `lmforge generate --prompts` vs
# transformers' `generate` on the same model and chat prompts, sampling at temperature 1 with no
# filter, alternating on one machine. Also the GRPO shape (8 prompts × 4 samples in one batch).
#
#   scripts/bench_rollouts.sh HF_MODEL_DIR PROMPTS.jsonl [ROUNDS] [NEW_TOKENS]
#
# PROMPTS: at least 32 records (scripts/arith_prompts.py's eval.jsonl). Batch 1 and 8 decode its
# first 8 prompts, batch 32 its first 32. Needs .venv-ref (torch, transformers). One JSON line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; DATA=$2; ROUNDS=${3:-2}; NEW=${4:-48}
BIN=target/release/lmforge
PY=.venv-ref/bin/python
TMP=$(mktemp -d)
export RAYON_NUM_THREADS=2
head -8 "$DATA" > "$TMP/p8.jsonl"
head -32 "$DATA" > "$TMP/p32.jsonl"
for r in $(seq "$ROUNDS"); do
  for b in 1 8 32; do
    f=$TMP/p8.jsonl; [ "$b" = 32 ] && f=$TMP/p32.jsonl
    $BIN generate --model "$MODEL" --prompts "$f" --chat --batch-size "$b" --max-new-tokens "$NEW" \
      --temperature 1.0 2>&1 >/dev/null | tail -1 | sed 's/^{/{"tool":"lmforge",/'
    $PY scripts/hf_generate_bench.py "$MODEL" "$f" "$b" "$NEW" 2>/dev/null | tail -1 | sed 's/^{/{"tool": "transformers", /'
  done
  $BIN generate --model "$MODEL" --prompts "$TMP/p8.jsonl" --samples 4 --chat --batch-size 32 \
    --max-new-tokens "$NEW" --temperature 1.0 2>&1 >/dev/null | tail -1 | sed 's/^{/{"tool":"lmforge","shape":"8x4",/'
  $PY scripts/hf_generate_bench.py "$MODEL" "$TMP/p8.jsonl" 32 "$NEW" 4 2>/dev/null | tail -1 | sed 's/^{/{"tool": "transformers", "shape": "8x4", /'
done
rm -rf "$TMP"
