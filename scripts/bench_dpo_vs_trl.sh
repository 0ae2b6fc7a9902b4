#!/usr/bin/env bash
# DPO step time and peak memory: lmforge vs TRL's DPOTrainer on the same model and pairs, in
# alternating rounds on one machine (ratios, not absolute numbers, are what carry over).
#
#   scripts/bench_dpo_vs_trl.sh HF_MODEL_DIR PAIRS.jsonl [ROUNDS] [STEPS]
#
# HF_MODEL_DIR: a model both sides load (e.g. `lmforge convert SmolLM2-135M-Instruct.Q4_1.gguf
# --out DIR`, with the chat template removed from tokenizer_config.json so both score raw text).
# PAIRS: {"prompt","chosen","rejected"} whose prompt + completion fit in 256 tokens
# (scripts/hh_pairs.py). Needs .venv-ref with torch, transformers, trl, peft, datasets.
# Prints one JSON line per run: {"tool", "variant", "step_s_median", "peak_rss_mib", ...}.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; DATA=$2; ROUNDS=${3:-2}; STEPS=${4:-6}
BIN=target/release/lmforge
PY=.venv-ref/bin/python
TMP=$(mktemp -d)
export RAYON_NUM_THREADS=2
lf() { # variant, extra flags...
  local v=$1; shift
  rm -rf "$TMP/run"
  $BIN dpo --model "$MODEL" --data "$DATA" --out "$TMP/run" --max-len 256 --max-steps "$STEPS" \
    --set train.lr=5e-5 --quiet "$@"
  python3 - "$TMP/run/metrics.jsonl" "$v" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r["step_s"] for r in rows if "step_s" in r]
s = [r for r in rows if r.get("summary")][0]
print(json.dumps({"tool": "lmforge", "variant": sys.argv[2], "steps": len(steps), "step_s": steps,
                  "step_s_median": statistics.median(steps[1:]), "peak_rss_mib": s["peak_rss_mib"]}))
PY
}
LORA=(--peft lora --lora-r 8 --lora-alpha 16 --lora-dropout 0)
for r in $(seq "$ROUNDS"); do
  $PY scripts/trl_dpo_bench.py --model "$MODEL" --data "$DATA" --steps "$STEPS" 2>/dev/null | tail -1 | sed 's/"tool": "trl"/"tool": "trl", "variant": "defaults (bf16, gradient checkpointing)"/'
  lf "lora, 1 pair x 4 micro-batches" "${LORA[@]}" --batch-size 1 --grad-accum 4
  $PY scripts/trl_dpo_bench.py --model "$MODEL" --data "$DATA" --steps "$STEPS" --fp32 2>/dev/null | tail -1 | sed 's/"tool": "trl"/"tool": "trl", "variant": "fp32, no checkpointing"/'
  lf "lora, 4 pairs x 1 micro-batch" "${LORA[@]}" --batch-size 4 --grad-accum 1
done
# Memory of the reference: precomputed, the same model with adapters off, or a frozen copy.
lf "lora, live reference (adapters off)" "${LORA[@]}" --batch-size 1 --grad-accum 4 --ref-live
lf "full fine-tune, precomputed reference" --batch-size 1 --grad-accum 4
lf "full fine-tune, live reference (frozen copy)" --batch-size 1 --grad-accum 4 --ref-live
rm -rf "$TMP"
