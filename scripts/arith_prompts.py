#!/usr/bin/env python3
"""Writes seeded two-digit arithmetic word problems as online-RL prompts (a verifiable reward:
`--reward number` checks the response's last number against "answer").

  python3 scripts/arith_prompts.py OUT_DIR [N_TRAIN] [N_EVAL] [SEED]
  -> OUT_DIR/train.jsonl, OUT_DIR/eval.jsonl: {"prompt": [{"role": "user", "content": …}], "answer": "68"}

Standard library only. Problems: addition and subtraction of two-digit numbers (results 0..198)
in a few phrasings; train and eval share no (template, a, b) triple.
"""
import json, pathlib, random, sys

NAMES = ["Tom", "Ana", "Lee", "Maya", "Omar", "Ines", "Raj", "Zoe", "Ken", "Lia"]
THINGS = ["apples", "books", "coins", "stamps", "marbles", "cards", "shells", "pens"]
ADD = [
    "{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?",
    "A box holds {a} {t}. {n} puts in another {b}. How many {t} are in the box?",
    "{n} collected {a} {t} on Monday and {b} on Tuesday. How many {t} in total?",
]
SUB = [
    "{n} has {a} {t} and gives away {b}. How many {t} are left?",
    "There were {a} {t} on a shelf. {n} took {b}. How many {t} remain?",
]


def problem(rng):
    add = rng.random() < 0.5
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if not add and b > a:
        a, b = b, a
    tpl = rng.choice(ADD if add else SUB)
    text = tpl.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b)
    key = (tpl, a, b)
    ans = a + b if add else a - b
    return key, {
        "prompt": [{"role": "user", "content": text + " Answer with just the number."}],
        "answer": str(ans),
    }


def main():
    out = pathlib.Path(sys.argv[1])
    n_train = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    n_eval = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_eval:
        key, row = problem(rng)
        if key in seen:
            continue
        seen.add(key)
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in [("train", rows[:n_train]), ("eval", rows[n_train:])]:
        with open(out / f"{name}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
    print(f"wrote {n_train} train and {n_eval} eval problems to {out}")


if __name__ == "__main__":
    main()
