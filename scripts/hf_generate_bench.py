#!/usr/bin/env python3
"""transformers' `generate` on a prompt file, as `lmforge generate --prompts FILE --chat` runs it:
the same chat-templated prompts, left-padded batches of --batch-size, sampling at temperature 1 with
no top-k/top-p filter, --max-new-tokens; prints one JSON line {"tokens_per_s", "new_tokens",
"decode_s", "batch_size"} (new tokens counted up to and including each row's EOS).

  .venv-ref/bin/python scripts/hf_generate_bench.py MODEL_DIR PROMPTS.jsonl BATCH NEW_TOKENS [SAMPLES]
"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, path, batch, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
samples = int(sys.argv[5]) if len(sys.argv) > 5 else 1
torch.set_num_threads(2)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir)
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
rows = [json.loads(l) for l in open(path) if l.strip()]
texts = []
for r in rows:
    p = r["prompt"]
    msgs = p if isinstance(p, list) else [{"role": "user", "content": p}]
    texts += [tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)] * samples
eos = model.generation_config.eos_token_id
eos = set(eos if isinstance(eos, list) else [eos])
pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos))
total, secs = 0, 0.0
for i in range(0, len(texts), batch):
    enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new, pad_token_id=pad)
    secs += time.perf_counter() - t0
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        n = 0
        for t in row:
            n += 1
            if t in eos:
                break
        total += n
print(json.dumps({"tokens_per_s": total / secs, "new_tokens": total, "decode_s": secs, "batch_size": batch}))
