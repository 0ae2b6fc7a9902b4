#!/usr/bin/env python3
"""SFT demo data: chatterbot-corpus (PyPI chatterbot-corpus==1.3.3, BSD) Q/A conversations as
lmforge chat JSONL, with a held-out split for before/after samples.

  pip download --no-deps chatterbot-corpus==1.3.3 -d DIR && python3 -m zipfile -e DIR/*.whl DIR/x
  python3 scripts/demo_sft.py DIR/x/chatterbot_corpus/data/english OUT   (needs PyYAML)

Writes OUT/train.jsonl, OUT/heldout.jsonl (every 10th conversation).
"""
import json, pathlib, sys
import yaml

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
convs = []
for f in sorted(src.glob("*.yml")):
    for c in yaml.safe_load(f.read_text()).get("conversations", []):
        turns = [str(t).strip() for t in c if str(t).strip()]
        if len(turns) < 2:
            continue
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        if msgs[-1]["role"] == "user":
            msgs = msgs[:-1]
        convs.append({"messages": msgs})
train = [c for i, c in enumerate(convs) if i % 10 != 0]
held = [c for i, c in enumerate(convs) if i % 10 == 0]
for name, rows in [("train", train), ("heldout", held)]:
    with open(out / f"{name}.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
print(f"{len(train)} train / {len(held)} held-out conversations")
