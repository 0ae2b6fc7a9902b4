#!/usr/bin/env bash
# The issue-17 demonstrations on SmolLM2-135M-Instruct (docs/online-rl.md, "Demos"):
#   A. GRPO with LoRA on seeded two-digit arithmetic word problems (scripts/arith_prompts.py),
#      reward = the response's last number is the answer: held-out accuracy (greedy, 200
#      problems) before → after, reward and KL curves (PNG), wall time;
#   B. PPO-RLHF with LoRA on HH-RLHF prompts, rewarded by the reward model of the alignment demo
#      (scripts/demo_alignment.sh step 1; RM_DIR is its OUT/rm/adapter, or rebuild it with the
#      command recorded in its demo.log): reward of greedy responses to held-out prompts before →
#      after, and the judge's win rate of the PPO model's responses over the base model's.
#
#   scripts/demo_online_rl.sh SMOLLM2_HF_DIR HH_PAIRS_DIR RM_DIR OUT_DIR
#
# SMOLLM2_HF_DIR: `lmforge convert SmolLM2-135M-Instruct.Q4_1.gguf --out DIR` (chat template kept).
# HH_PAIRS_DIR: scripts/hh_pairs.py's output (train.jsonl, heldout.jsonl). Every command and its
# wall time go to OUT_DIR/demo.log; a step whose output exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
M=$(realpath "$1"); PAIRS=$(realpath "$2"); RM=$(realpath "$3"); OUT=$4
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
source scripts/demo_lib.sh

# A. GRPO on arithmetic.
[ -e "$OUT/arith/train.jsonl" ] || python3 scripts/arith_prompts.py "$OUT/arith" 2000 200 0 >> "$LOG"
step grpo "$OUT/grpo/adapter" "$BIN" grpo --model "$M" --data "$OUT/arith/train.jsonl" \
  --eval-data "$OUT/arith/eval.jsonl" --reward number --num-generations 8 --batch-size 8 \
  --grad-accum 4 --max-new-tokens 48 --temperature 0.7 --beta 0.02 --peft lora --lora-dropout 0 \
  --lr 2e-4 --max-steps 60 --eval-every 30 --out "$OUT/grpo"
step grpo_plot "$OUT/grpo.png" "$BIN" plot "$OUT/grpo" --metric reward --metric kl \
  --metric eval_reward --out "$OUT/grpo.png"

# B. PPO-RLHF on HH-RLHF prompts with the reward model.
if [ ! -e "$OUT/hh/train.jsonl" ]; then
  mkdir -p "$OUT/hh"
  # Single-turn prompts as chat messages: the RM and the policy see the same conversation.
  python3 - "$PAIRS" "$OUT/hh" <<'PY'
import json, sys
src, dst = sys.argv[1:]
for name, n in [("train", 400), ("heldout", 48)]:
    seen, rows = set(), []
    for l in open(f"{src}/{name}.jsonl"):
        p = json.loads(l)["prompt"]
        if p.count("\n\nHuman:") != 1 or p in seen:
            continue
        seen.add(p)
        q = p.split("\n\nHuman:", 1)[1].rsplit("\n\nAssistant:", 1)[0].strip()
        rows.append({"prompt": [{"role": "user", "content": q}]})
    with open(f"{dst}/{name}.jsonl", "w") as f:
        for r in rows[:n]:
            f.write(json.dumps(r) + "\n")
PY
fi
step ppo "$OUT/ppo/adapter" "$BIN" ppo --model "$M" --data "$OUT/hh/train.jsonl" \
  --eval-data "$OUT/hh/heldout.jsonl" --reward-model "$RM" --reward-model-base "$M" \
  --max-new-tokens 64 --temperature 0.9 --batch-size 8 --grad-accum 2 --prompts-per-rollout 32 \
  --ppo-epochs 2 --missing-eos-penalty 1.0 --peft lora --lora-dropout 0 --lr 5e-5 --max-steps 40 \
  --eval-every 20 --out "$OUT/ppo"
step ppo_plot "$OUT/ppo.png" "$BIN" plot "$OUT/ppo" --metric reward --metric objective/kl \
  --metric eval_reward --out "$OUT/ppo.png"
# The judge (the base SmolLM2, both orders) on base vs PPO greedy responses to the held-out prompts.
for who in base ppo; do
  ad=(); [ $who = ppo ] && ad=(--adapter "$OUT/ppo/adapter")
  step gen_$who "$OUT/gen_$who.jsonl" sh -c "\"$BIN\" generate --model \"$M\" ${ad[*]} --prompts \"$OUT/hh/heldout.jsonl\" --chat --temperature 0 --max-new-tokens 64 --batch-size 16 > \"$OUT/gen_$who.jsonl\""
done
[ -e "$OUT/vs.jsonl" ] || python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
qs = [json.loads(l)["prompt"][0]["content"] for l in open(f"{out}/hh/heldout.jsonl")]
base = [json.loads(l)["response"] for l in open(f"{out}/gen_base.jsonl")]
ppo = [json.loads(l)["response"] for l in open(f"{out}/gen_ppo.jsonl")]
with open(f"{out}/vs.jsonl", "w") as f:
    for q, b, p in zip(qs, base, ppo):
        if b.strip() != p.strip():
            f.write(json.dumps({"prompt": q, "responses": [p, b]}) + "\n")
PY
step judge "$OUT/judged.jsonl" "$BIN" label --judge "$M" --data "$OUT/vs.jsonl" --min-margin 0 \
  --out "$OUT/judged.jsonl"
python3 - "$OUT" <<'PY' >> "$LOG"
import json, sys
out = sys.argv[1]
vs = [json.loads(l) for l in open(f"{out}/vs.jsonl")]
j = [json.loads(l) for l in open(f"{out}/judged.jsonl")]
ppo = {(r["prompt"], r["responses"][0]) for r in vs}
wins = sum((r["prompt"], r["chosen"]) in ppo for r in j)
n = sum(1 for _ in open(f"{out}/hh/heldout.jsonl"))
print(f"# judge: PPO response preferred in {wins} of {len(j)} changed answers ({len(vs)} differ of {n})")
PY
