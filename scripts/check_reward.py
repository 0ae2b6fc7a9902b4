#!/usr/bin/env python3
"""Checks a reward model lmforge wrote, in Python: AutoModelForSequenceClassification loads MODEL
(num_labels 1) with no missing or unexpected weights, and its rewards for the pairs of PAIRS
({"prompt","chosen","rejected"} strings, a model without a chat template) equal the ones
`lmforge reward score` printed (SCORES, its JSONL output). With --adapter DIR --base DIR the PEFT
adapter (LoRA + `score` in modules_to_save) is applied to BASE instead of loading MODEL.

  lmforge reward score --model RUN/model --data pairs.jsonl > scores.jsonl
  .venv-ref/bin/python scripts/check_reward.py RUN/model pairs.jsonl scores.jsonl
  .venv-ref/bin/python scripts/check_reward.py RUN/adapter pairs.jsonl scores.jsonl --adapter RUN/adapter --base BASE
"""
import argparse, json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("pairs"); ap.add_argument("scores")
ap.add_argument("--adapter"); ap.add_argument("--base")
a = ap.parse_args()
if a.adapter:
    from peft import PeftModel
    base = AutoModelForSequenceClassification.from_pretrained(a.base, num_labels=1)
    tok = AutoTokenizer.from_pretrained(a.base)
    # lmforge pads a decoder with EOS (its saved config says so); BERT with [PAD].
    base.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    m, bad = PeftModel.from_pretrained(base, a.adapter), {}
else:
    m, info = AutoModelForSequenceClassification.from_pretrained(a.model, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    tok = AutoTokenizer.from_pretrained(a.model)
m = m.eval()
tok.pad_token_id = m.config.pad_token_id
tok.padding_side = "right"
rows = [json.loads(l) for l in open(a.pairs) if l.strip()]
rows = [r for r in rows if isinstance(r.get("prompt"), str) and isinstance(r.get("chosen"), str)]
scores = [json.loads(l) for l in open(a.scores)][:-1]
assert len(scores) == len(rows), f"{len(scores)} scores for {len(rows)} standard-form pairs"
def rewards(texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return m(**enc).logits[:, 0].tolist()
rc = rewards([r["prompt"] + r["chosen"] for r in rows])
rr = rewards([r["prompt"] + r["rejected"] for r in rows])
d = max(max(abs(x - s["chosen"]), abs(y - s["rejected"])) for x, y, s in zip(rc, rr, scores))
print(f"{m.__class__.__name__}: loading problems {bad or 'none'}; {len(rows)} pairs; "
      f"max |reward - lmforge's| {d:.3e}")
sys.exit(0 if not bad and d < 1e-4 else 1)
