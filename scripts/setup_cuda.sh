#!/usr/bin/env bash
# Installs the CUDA toolkit pieces lmforge's `cuda` feature needs, from PyPI, into .venv-cuda/
# (no system CUDA, no root), and writes .venv-cuda/env.sh to source before building:
#
#   scripts/setup_cuda.sh [--build-only] && . .venv-cuda/env.sh
#   cargo build --release --features cuda
#
# --build-only: what compiling needs (nvcc and headers, ~150 MB; enough without a GPU, as in
# CI); otherwise also the libraries a GPU run loads (cuBLAS, cuRAND, NVRTC, NCCL; the driver's
# libcuda comes with the machine). CUDA 13.0: the cu12 nvcc wheels carry only ptxas (no nvcc
# binary, checked 12.1.105 to 12.9.86); the CUDA 13 wheels carry the whole compiler.
# candle-kernels compiles its kernels for CUDA_COMPUTE_CAP (nvidia-smi is not needed; default
# 90, the H100/H200; set it for other GPUs: 80 A100, 89 L4/L40, 100 B200).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-cuda
BUILD=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
       nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96)
RUN=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
     "nvidia-nccl-cu13>=2.27")
PKGS=("${BUILD[@]}")
[ "${1:-}" = "--build-only" ] || PKGS+=("${RUN[@]}")
[ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "${PKGS[@]}"
ROOT=$(cd "$VENV" && pwd)/$(cd "$VENV" && ls -d lib/python3*/site-packages/nvidia/cu13)
# candle-kernels links -lcudart: the linker wants the unversioned name.
ln -sf libcudart.so.13 "$ROOT/lib/libcudart.so"
LIBS=$(cd "$VENV" && for d in lib/python3*/site-packages/nvidia/*/lib; do printf '%s:' "$(pwd)/$d"; done)
cat > "$VENV/env.sh" <<ENV
# Written by scripts/setup_cuda.sh: the CUDA 13.0 toolkit from PyPI wheels.
export CUDA_ROOT="$ROOT" CUDA_PATH="$ROOT"
export PATH="$ROOT/bin:\$PATH"
export LIBRARY_PATH="$ROOT/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$LIBS\${LD_LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
ENV
. "$VENV/env.sh"
echo "CUDA from PyPI in $VENV: $(nvcc --version | tail -1); source $VENV/env.sh before cargo build --features cuda"
