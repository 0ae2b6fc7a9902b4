#!/usr/bin/env python3
"""BIG-bench's HHH alignment task (Askell et al. 2021; PyPI `bigbench==1.0.0`, Apache-2.0) as
preference pairs for lmforge's demos: each example's input as an HH-style prompt, its response
with target score 1 as "chosen" and the other as "rejected".

  tar -xzf bigbench-1.0.0.tar.gz --wildcards 'bigbench-1.0.0/bigbench/benchmark_tasks/hhh_alignment/*'
  python3 scripts/hhh_pairs.py bigbench-1.0.0/bigbench/benchmark_tasks/hhh_alignment > hhh.jsonl
"""
import json, pathlib, sys

root = pathlib.Path(sys.argv[1])
n = 0
for sub in ["harmless", "helpful", "honest", "other"]:
    task = json.load(open(root / sub / "task.json"))
    for e in task["examples"]:
        good = [t for t, s in e["target_scores"].items() if s == 1]
        bad = [t for t, s in e["target_scores"].items() if s == 0]
        if len(good) != 1 or len(bad) != 1:
            continue
        prompt = "\n\nHuman: " + e["input"].strip() + "\n\nAssistant:"
        print(json.dumps({"prompt": prompt, "chosen": " " + good[0].strip(), "rejected": " " + bad[0].strip(),
                          "category": sub}))
        n += 1
print(f"{n} pairs", file=sys.stderr)
