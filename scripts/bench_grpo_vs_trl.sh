#!/usr/bin/env bash
# GRPO step time and peak memory: lmforge vs TRL's GRPOTrainer on the same model, prompts, group
# size and lengths, in alternating rounds on one machine (ratios carry over, absolute numbers don't).
#
#   scripts/bench_grpo_vs_trl.sh HF_MODEL_DIR TRAIN.jsonl [ROUNDS] [STEPS]
#
# HF_MODEL_DIR: e.g. `lmforge convert SmolLM2-135M-Instruct.Q4_1.gguf --out DIR` (its chat template
# kept: the prompts are conversations). TRAIN: scripts/arith_prompts.py's train.jsonl. Per step: 8
# prompts × 4 samples × up to 48 new tokens (lmforge: 4 micro-batches of 8 rows, the same step),
# LoRA r=8 on all linear layers, β = 0, 2 threads.
# Needs .venv-ref with torch, transformers, trl, peft, datasets. One JSON line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; DATA=$2; ROUNDS=${3:-2}; STEPS=${4:-3}
BIN=target/release/lmforge
PY=.venv-ref/bin/python
TMP=$(mktemp -d)
export RAYON_NUM_THREADS=2
lf() {
  rm -rf "$TMP/run"
  $BIN grpo --model "$MODEL" --data "$DATA" --out "$TMP/run" --reward number --num-generations 4 \
    --batch-size 8 --grad-accum 4 --max-new-tokens 48 --temperature 1.0 --max-steps "$STEPS" \
    --peft lora --lora-r 8 --lora-alpha 16 --lora-dropout 0 --lr 1e-5 --quiet
  python3 - "$TMP/run/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r["step_s"] for r in rows if "step_s" in r]
roll = [r["rollout_s"] for r in rows if "rollout_s" in r]
s = [r for r in rows if r.get("summary")][0]
print(json.dumps({"tool": "lmforge", "steps": len(steps), "step_s": steps,
                  "step_s_median": statistics.median(steps[1:] or steps),
                  "rollout_s_median": statistics.median(roll[1:] or roll), "peak_rss_mib": s["peak_rss_mib"]}))
PY
}
for r in $(seq "$ROUNDS"); do
  $PY scripts/trl_grpo_bench.py --model "$MODEL" --data "$DATA" --steps "$STEPS" 2>/dev/null | tail -1
  lf
done
rm -rf "$TMP"
