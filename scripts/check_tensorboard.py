"""TensorBoard reads lmforge's event files: every scalar of RUN/tensorboard/ (loaded with
TensorBoard's own EventAccumulator) against RUN/metrics.jsonl.

    pip install tensorboard
    lmforge pretrain ... --tensorboard --out RUN
    python scripts/check_tensorboard.py RUN
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run):
    ea = EventAccumulator(f"{run}/tensorboard")
    ea.Reload()
    tags = ea.Tags()["scalars"]
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl") if line.strip()]
    worst, n = 0.0, 0
    for tag in tags:
        for e in ea.Scalars(tag):
            want = [r[tag] for r in rows if r.get("step") == e.step and isinstance(r.get(tag), (int, float))
                    and not isinstance(r.get(tag), bool)]
            if not want:
                sys.exit(f"{tag} at step {e.step} is not in metrics.jsonl")
            worst = max(worst, abs(e.value - want[0]) / max(abs(want[0]), 1e-30))
            n += 1
    print(f"{n} scalars of {len(tags)} tags read by TensorBoard; largest relative difference "
          f"from metrics.jsonl {worst:.2e} (stored as f32)")


if __name__ == "__main__":
    main(sys.argv[1])
