"""Compares lmforge's samples.jsonl with lm-evaluation-harness's --log_samples output: the
largest per-choice log-likelihood difference, agreement of acc/acc_norm, and the speed ratio.
Prints one JSON line."""
import argparse
import glob
import json

ap = argparse.ArgumentParser()
ap.add_argument("lmforge_samples")
ap.add_argument("lm_eval_dir")
ap.add_argument("--lmforge-s", type=float)
ap.add_argument("--lm-eval-s", type=float)
ap.add_argument("--shots", type=int)
a = ap.parse_args()
ours = [json.loads(l) for l in open(a.lmforge_samples)]
path = sorted(glob.glob(f"{a.lm_eval_dir}/**/samples_*.jsonl", recursive=True))[-1]
theirs = {}
for l in open(path):
    d = json.loads(l)
    theirs[d["doc_id"]] = d
diff, same_acc, same_norm = 0.0, 0, 0
for o in ours:
    t = theirs[o["doc_id"]]
    lls = [float(r[0][0]) for r in t["resps"]]
    diff = max(diff, max(abs(x - y) for x, y in zip(o["logprobs"], lls)))
    same_acc += int(o["acc"] == t["acc"])
    same_norm += int(o["acc_norm"] == t["acc_norm"])
n = len(ours)
print(json.dumps({
    "shots": a.shots, "items": n, "max_abs_loglik_diff": diff,
    "acc_lmforge": sum(o["acc"] for o in ours) / n, "acc_lm_eval": sum(theirs[o["doc_id"]]["acc"] for o in ours) / n,
    "acc_agree": same_acc / n, "acc_norm_agree": same_norm / n,
    "lmforge_s": a.lmforge_s, "lm_eval_s": a.lm_eval_s,
    "speedup": a.lm_eval_s / a.lmforge_s if a.lmforge_s else None,
}))
