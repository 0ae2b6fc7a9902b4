#!/usr/bin/env bash
# Data-parallel scaling on this machine (docs/distributed.md): the same pre-training steps as
# 1 rank × batch 2b and as 2 ranks × batch b (mpirun, one thread per rank), alternating, ROUNDS
# times; then the median tokens/s of each, and for 2 ranks the median seconds of a step's
# gradient all-reduce (packing included, and inside MPI alone) over shared memory (Open MPI's
# vader) and over loopback TCP.
#
#   scripts/scaling.sh [BIN] [ROUNDS]     (BIN: target/release/lmforge; WORK: /tmp/lmf_scaling)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/release/lmforge}")
ROUNDS=${2:-3}
WORK=${WORK:-/tmp/lmf_scaling}
STEPS=${STEPS:-12}
B=${B:-4}
mkdir -p "$WORK"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RAYON_NUM_THREADS=1
CORPUS=data/shakespeare/hamlet.txt
COMMON=(--data "$CORPUS" --set train.lr=1e-3
        --set model.d_model=384 --set model.n_layer=6 --set model.n_head=6 --set model.ctx=256
        --set data.seq_len=256 --set tokenizer.vocab_size=4096 --set train.checkpoint_every=0)
# The tokenizer and token cache are made once, then shared by every run.
[ -f "$WORK/tokenizer.json" ] || {
    "$BIN" pretrain "${COMMON[@]}" --max-steps 1 --batch-size 1 --out "$WORK/prep" --overwrite
    cp "$WORK/prep/tokenizer.json" "$WORK/tokenizer.json"
}
COMMON+=(--quiet --max-steps "$STEPS" --set "tokenizer.file=$WORK/tokenizer.json")
one()  { "$BIN" pretrain "${COMMON[@]}" --batch-size $((2 * B)) --out "$WORK/one" --overwrite; }
two()  { mpirun -np 2 --oversubscribe -x RAYON_NUM_THREADS "$@" \
           "$BIN" pretrain "${COMMON[@]}" --batch-size "$B" --out "$WORK/two" --overwrite; }
# Median over steps 3.. (the first two warm the allocator) of a metrics key.
med() { python3 - "$1/metrics.jsonl" "$2" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
print(statistics.median(r[sys.argv[2]] for r in rows[2:]))
PY
}
for r in $(seq "$ROUNDS"); do
    one; echo "round $r 1x1 tokens_per_s $(med "$WORK/one" tokens_per_s)"
    two; echo "round $r 2x1-shm tokens_per_s $(med "$WORK/two" tokens_per_s) allreduce_s $(med "$WORK/two" allreduce_s) in_mpi_s $(med "$WORK/two" allreduce_transport_s)"
    two --mca btl self,tcp --mca btl_tcp_if_include lo
    echo "round $r 2x1-tcp tokens_per_s $(med "$WORK/two" tokens_per_s) allreduce_s $(med "$WORK/two" allreduce_s) in_mpi_s $(med "$WORK/two" allreduce_transport_s)"
done
