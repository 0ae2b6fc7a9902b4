#!/usr/bin/env python3
"""Loads a GGUF model with transformers (which dequantizes it) and reports what lmforge's
`generate --chat --temperature 0` and `score --json` report, for side-by-side comparison:

  load time, greedy decode tokens/s and text for a chat prompt; mean NLL of a text file.

Usage: python scripts/compare_gguf.py FILE.gguf "PROMPT" TEXT_FILE [MAX_NEW_TOKENS]
Needs: pip install torch transformers gguf
"""
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path, prompt, text_file = sys.argv[1], sys.argv[2], sys.argv[3]
max_new = int(sys.argv[4]) if len(sys.argv) > 4 else 128
torch.manual_seed(0)
d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
t0 = time.time()
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
load_s = time.time() - t0
ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    t1 = time.time()
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id)
    gen_s = time.time() - t1
new = out[0, ids.shape[1]:]
n_new = int((new != tok.eos_token_id).sum())
text = open(text_file).read()
enc = tok(text, return_tensors="pt")["input_ids"][:, :model.config.max_position_embeddings]
with torch.no_grad():
    nll = model(enc, labels=enc).loss.item()
print(json.dumps({"load_s": round(load_s, 2), "prompt_tokens": ids.shape[1], "new_tokens": n_new,
                  "decode_tokens_per_s": round(n_new / gen_s, 1), "nll": nll, "nll_tokens": enc.shape[1] - 1,
                  "text": tok.decode(new, skip_special_tokens=True)}))
