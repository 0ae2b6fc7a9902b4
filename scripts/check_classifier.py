#!/usr/bin/env python3
"""Checks a classifier lmforge wrote, in Python: AutoModelForSequenceClassification loads MODEL
with no missing or unexpected weights and reports accuracy on DATA (JSONL text,label). With
--adapter ADAPTER --base BASE it also applies the PEFT adapter (LoRA + head in modules_to_save)
to BASE and compares its logits with MODEL's (the merged model).

  .venv-ref/bin/python scripts/check_classifier.py MODEL DATA [--adapter DIR --base DIR]
"""
import argparse, json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("data")
ap.add_argument("--adapter"); ap.add_argument("--base")
a = ap.parse_args()
m, info = AutoModelForSequenceClassification.from_pretrained(a.model, output_loading_info=True)
bad = {k: v for k, v in info.items() if v}
tok = AutoTokenizer.from_pretrained(a.model)
rows = [json.loads(l) for l in open(a.data) if l.strip()]
enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=256, return_tensors="pt")
with torch.no_grad():
    logits = m.eval()(**enc).logits
pred = [m.config.id2label[i] for i in logits.argmax(-1).tolist()]
acc = sum(p == str(r["label"]) for p, r in zip(pred, rows)) / len(rows)
print(f"{m.__class__.__name__}: loading problems {bad or 'none'}; accuracy {acc:.4f} on {len(rows)}")
ok = not bad
if a.adapter:
    from peft import PeftModel
    base = AutoModelForSequenceClassification.from_pretrained(a.base, num_labels=m.config.num_labels,
                                                              id2label=m.config.id2label, label2id=m.config.label2id)
    base.config.pad_token_id = m.config.pad_token_id
    p = PeftModel.from_pretrained(base, a.adapter).eval()
    with torch.no_grad():
        d = (p(**enc).logits - logits).abs().max().item()
    print(f"peft(base + adapter) vs merged: max |logit diff| {d:.3e}")
    ok = ok and d < 1e-4
sys.exit(0 if ok else 1)
