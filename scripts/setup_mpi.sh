#!/usr/bin/env bash
# Installs Open MPI (mpirun and libmpi.so.40) from Debian/Ubuntu packages, for data-parallel
# training: `mpirun -np N lmforge sft ...` (docs/distributed.md). lmforge itself needs no MPI
# to build; it loads libmpi at run time, only when started by mpirun.
set -euo pipefail
if command -v mpirun >/dev/null && ldconfig -p | grep -q 'libmpi.so.40'; then
    echo "Open MPI is installed: $(mpirun --version | head -1)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "error: run as root or install sudo" >&2; exit 1; }
    SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends openmpi-bin ||
    { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends openmpi-bin; }
echo "installed: $(mpirun --version | head -1)"
if [ "$(id -u)" = 0 ]; then
    echo "as root, mpirun needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 (or --allow-run-as-root)"
fi
