#!/usr/bin/env python3
"""Prepares HH-RLHF preference pairs for lmforge's demos and benchmarks (not for tests).

Reads `harmless-base-test.jsonl.gz` ({"chosen", "rejected"} dialogues), splits each pair after the
last "\\n\\nAssistant:" the two dialogues share (the rule `lmforge dpo` applies itself), keeps pairs
whose prompt + longer completion fit in --max-tokens under the given tokenizer, and writes a
seeded sample in TRL's standard form {"prompt", "chosen", "rejected"}, split by prompt into
train and held-out files. Needs only the `tokenizers` package.

  python3 scripts/hh_pairs.py --hh ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz \
      --tokenizer MODEL/tokenizer.json --max-tokens 256 --train 400 --heldout 100 --out-dir /tmp/hh
"""
import argparse, gzip, json, pathlib, random
from tokenizers import Tokenizer

A = "\n\nAssistant:"

def split(c, r):
    n = 0
    for x, y in zip(c, r):
        if x != y:
            break
        n += 1
    cut = c[:n].rfind(A)
    if cut < 0:
        return None
    cut += len(A)
    return c[:cut], c[cut:], r[cut:]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hh", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args()
    tok = Tokenizer.from_file(a.tokenizer)
    pairs = []
    for line in gzip.open(a.hh, "rt"):
        d = json.loads(line)
        s = split(d["chosen"], d["rejected"])
        if s is None or s[1] == s[2] or not s[1].strip() or not s[2].strip():
            continue
        p, c, r = s
        n = len(tok.encode(p).ids) + max(len(tok.encode(c).ids), len(tok.encode(r).ids)) + 1
        if n <= a.max_tokens:
            pairs.append({"prompt": p, "chosen": c, "rejected": r})
    # Split by prompt: every pair of a prompt lands on one side.
    prompts = sorted({x["prompt"] for x in pairs})
    random.Random(a.seed).shuffle(prompts)
    held = set()
    for p in prompts:
        if sum(1 for x in pairs if x["prompt"] in held) >= a.heldout:
            break
        held.add(p)
    rng = random.Random(a.seed + 1)
    train = [x for x in pairs if x["prompt"] not in held]
    test = [x for x in pairs if x["prompt"] in held]
    rng.shuffle(train)
    out = pathlib.Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in [("train.jsonl", train[: a.train]), ("heldout.jsonl", test[: a.heldout])]:
        with open(out / name, "w") as f:
            for x in rows:
                f.write(json.dumps(x) + "\n")
        print(name, len(rows))
    print(f"{len(pairs)} pairs fit in {a.max_tokens} tokens")

if __name__ == "__main__":
    main()
