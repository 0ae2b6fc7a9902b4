#!/usr/bin/env bash
# lmforge eval vs lm-evaluation-harness (hf backend, CPU) on the same MMLU items, model and
# demonstrations: per-item log-likelihoods (compare_lm_eval.py) and wall time, 0- and 5-shot.
#
#   scripts/compare_lm_eval.sh MODEL_DIR [DATA_DIR] [N]
# MODEL_DIR: an HF directory transformers loads (e.g. `lmforge convert SmolLM2….gguf --out DIR`).
# Needs .venv-ref with lm_eval (pip install lm_eval==0.4.13) and scripts/fetch_eval_data.py's data.
set -euo pipefail
MODEL=$1
DATA=${2:-data/eval}
N=${3:-100}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
BIN=${LMFORGE:-target/release/lmforge}
mkdir -p "$WORK/task/data"
head -n "$N" "$DATA/mmlu/test.jsonl" > "$WORK/task/data/test100.jsonl"
tail -n 50 "$DATA/mmlu/test.jsonl" > "$WORK/task/data/dev.jsonl"
cp "$HERE/lm_eval_compare/mmlu_lmf.toml" "$WORK/task/"
sed "s#\${DATA}#$WORK/task/data#g" "$HERE/lm_eval_compare/mmlu_lmf.yaml" > "$WORK/task/mmlu_lmf.yaml"
export RAYON_NUM_THREADS=${THREADS:-2} OMP_NUM_THREADS=${THREADS:-2} HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for shots in 0 5; do
  t0=$(date +%s.%N)
  "$BIN" eval --model "$MODEL" --tasks "$WORK/task/mmlu_lmf.toml" --shots $shots --out "$WORK/lmforge$shots" > "$WORK/lmforge$shots.md"
  t1=$(date +%s.%N)
  .venv-ref/bin/lm_eval --model hf --model_args "pretrained=$MODEL,dtype=float32" --tasks mmlu_lmf \
    --include_path "$WORK/task" --num_fewshot $shots --batch_size 1 --device cpu \
    --output_path "$WORK/lmeval$shots" --log_samples > "$WORK/lmeval$shots.log" 2>&1
  t2=$(date +%s.%N)
  .venv-ref/bin/python "$HERE/compare_lm_eval.py" "$WORK/lmforge$shots/samples.jsonl" "$WORK/lmeval$shots" \
    --lmforge-s "$(echo "$t1 - $t0" | bc)" --lm-eval-s "$(echo "$t2 - $t1" | bc)" --shots $shots
done
echo "work dir: $WORK"
