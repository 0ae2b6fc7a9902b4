#!/usr/bin/env bash
# One training step (forward, backward, AdamW) of the same small decoder in lmforge (`lmforge bench`)
# and in PyTorch (scripts/torch_reference.py), run alternately on this machine so both sides see the
# same load; prints each run, the medians and the per-round paired ratios. Results: docs/benchmarks.md.
#
#   scripts/bench_vs_torch.sh [ROUNDS] [CONFIG...]      CONFIG: gpt2 | llama  (default: both)
#
# Needs a release build (cargo build --release) and a Python with torch: $TORCH_PY, else
# .venv-torchref/bin/python, else .venv-ref/bin/python
# (python3 -m venv .venv-torchref && .venv-torchref/bin/pip install torch).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
shift || true
configs=("$@")
[ ${#configs[@]} -eq 0 ] && configs=(gpt2 llama)

py=${TORCH_PY:-}
for c in .venv-torchref/bin/python .venv-ref/bin/python; do
    [ -z "$py" ] && [ -x "$c" ] && py=$c
done
[ -n "$py" ] || { echo "error: no Python with torch (set TORCH_PY or create .venv-torchref)" >&2; exit 2; }
bin=target/release/lmforge
[ -x "$bin" ] || { echo "error: $bin missing: run cargo build --release" >&2; exit 2; }
# The PyTorch side: scripts/torch_reference.py (TORCH_REFERENCE=FILE runs another script instead).
ref=${TORCH_REFERENCE:-scripts/torch_reference.py}
[ -f "$ref" ] || { echo "error: $ref missing" >&2; exit 2; }

flags_for() {
    case $1 in
        gpt2) echo "--arch gpt2 --layers 6 --heads 6 --dim 384 --seq 256 --batch 8 --vocab 65" ;;
        llama) echo "--arch llama --layers 6 --heads 6 --kv-heads 2 --dim 384 --seq 256 --batch 8 --vocab 4096" ;;
        *) echo "error: unknown config $1 (gpt2 | llama)" >&2; exit 2 ;;
    esac
}

log=$(mktemp)
trap 'rm -f "$log"' EXIT
for cfg in "${configs[@]}"; do
    flags=$(flags_for "$cfg")
    for r in $(seq 1 "$rounds"); do
        # alternate which side goes first so neither always runs on a warmer machine
        order=(lmforge torch)
        [ $((r % 2)) -eq 0 ] && order=(torch lmforge)
        for side in "${order[@]}"; do
            if [ "$side" = lmforge ]; then
                # shellcheck disable=SC2086
                out=$("$bin" bench $flags --steps 6 --threads 2)
            else
                # shellcheck disable=SC2086
                out=$("$py" "$ref" $flags --steps 6 --threads 2)
            fi
            echo "$cfg $side $r $out" | tee -a "$log"
        done
    done
done

python3 - "$log" <<'EOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    cfg, side, rnd, js = line.split(" ", 3)
    runs.setdefault(cfg, {}).setdefault(side, []).append((int(rnd), json.loads(js)))
print()
print(f"{'config':8} {'side':8} {'runs':>4} {'tok/s median':>13} {'step ms':>9} {'peak RSS MiB':>13}")
for cfg, sides in runs.items():
    med = {}
    for side, rs in sides.items():
        rs = [r for _, r in rs]
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        ms = statistics.median(r["step_ms_median"] for r in rs)
        rss = statistics.median(r["peak_rss_mib"] for r in rs)
        med[side] = (tps, rss)
        print(f"{cfg:8} {side:8} {len(rs):>4} {tps:>13.1f} {ms:>9.1f} {rss:>13.1f}")
    if len(med) == 2:
        (lt, lr), (tt, tr) = med["lmforge"], med["torch"]
        print(f"{cfg:8} ratio    lmforge/torch tokens/s {lt / tt:.2f}x, peak RSS {lr / tr:.2f}x")
        # The two runs of a round are back to back, so their ratio sees the same machine load.
        by = {side: {k: r["tokens_per_s"] for k, r in rs} for side, rs in sides.items()}
        paired = sorted(by["lmforge"][k] / by["torch"][k] for k in by["lmforge"] if k in by["torch"])
        print(f"{cfg:8} paired   per-round ratios {' '.join(f'{x:.2f}' for x in paired)}; "
              f"median {statistics.median(paired):.2f}x")
EOF
