#!/usr/bin/env python3
"""Checks an lmforge adapter of any method Python PEFT has (LoRA, DoRA, IA³, prefix tuning,
prompt tuning, P-tuning) without merging: the mean next-token NLL of TEXT (one window) under
transformers + peft, against `lmforge score --adapter` on the same text. Prints both and the
difference; exits 1 above --tol or when the adapter does not move the NLL.

  .venv-ref/bin/python scripts/check_peft_score.py BASE ADAPTER TEXT [--lmforge BIN] [--tol 1e-5]
"""
import argparse, json, subprocess, sys
import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("base"); ap.add_argument("adapter"); ap.add_argument("text")
ap.add_argument("--lmforge", default="target/release/lmforge")
ap.add_argument("--tol", type=float, default=1e-5)
a = ap.parse_args()

def lmforge_nll(*extra):
    out = subprocess.run([a.lmforge, "score", "--model", a.base, "--file", a.text, "--json", *extra],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)

tok = Tokenizer.from_file(f"{a.base}/tokenizer.json")
ids = torch.tensor([tok.encode(open(a.text).read()).ids])
base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32).eval()

def nll(model):
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    logits = logits[:, logits.shape[1] - ids.shape[1]:]  # prompt tuning: drop the virtual positions
    lp = torch.log_softmax(logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])
    return -lp.mean().item()

plain = nll(base)
peft = nll(PeftModel.from_pretrained(base, a.adapter).eval())
ours = lmforge_nll("--adapter", a.adapter)
assert ours["tokens"] == ids.shape[1] - 1, f"tokenisation differs: {ours['tokens']} vs {ids.shape[1] - 1}"
d = abs(ours["nll"] - peft)
print(f"{a.adapter}: mean NLL peft {peft:.6f}, lmforge {ours['nll']:.6f}, |diff| {d:.2e}; "
      f"base {plain:.6f} (adapter moves it by {abs(peft - plain):.2e})")
sys.exit(0 if d <= a.tol and abs(peft - plain) > 10 * a.tol else 1)
