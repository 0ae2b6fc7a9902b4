#!/usr/bin/env python3
"""Checks an lmforge LoRA adapter in Python: loads BASE with transformers, applies ADAPTER with
peft, and compares its logits with transformers' logits of MERGED (what `lmforge merge` or
`lmforge sft --merge` wrote). Prints the largest difference; exits 1 above --tol.

  .venv-ref/bin/python scripts/check_peft.py BASE ADAPTER MERGED [--tol 1e-4]
"""
import argparse, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("base"); ap.add_argument("adapter"); ap.add_argument("merged")
ap.add_argument("--tol", type=float, default=1e-4)
a = ap.parse_args()
base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32).eval()
vocab, ctx = base.config.vocab_size, 32
ids = torch.randint(0, vocab, (2, ctx), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    plain = base(input_ids=ids).logits
    peft = PeftModel.from_pretrained(base, a.adapter).eval()
    adapted = peft(input_ids=ids).logits
    merged = AutoModelForCausalLM.from_pretrained(a.merged, dtype=torch.float32).eval()(input_ids=ids).logits
d = (adapted - merged).abs().max().item()
moved = (adapted - plain).abs().max().item()
print(f"peft(base + adapter) vs merged: max |diff| {d:.3e}; adapter moves logits by up to {moved:.3e}")
sys.exit(0 if d <= a.tol and moved > 10 * a.tol else 1)
