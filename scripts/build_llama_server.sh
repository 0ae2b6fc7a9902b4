#!/usr/bin/env bash
# Builds llama.cpp's OpenAI-compatible server (llama-server), the peer `scripts/load_test.py`
# compares `lmforge serve` with, from the llama.cpp sources vendored in llama-cpp-python's PyPI
# sdist (no binary of it is on PyPI or in Debian 12). Needs g++; cmake and ninja come from PyPI.
#   scripts/build_llama_server.sh [DIR]     # default DIR: /tmp/llama-server; ~15 min on 2 cores
# Then: DIR/llama-server -m MODEL.gguf --port 8501 -t 2 -c 4096 --parallel 8 --alias NAME
set -euo pipefail
out="${1:-/tmp/llama-server}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q cmake ninja
"$work/venv/bin/pip" download -q --no-deps --no-binary=:all: --no-build-isolation -d "$work" \
    "llama-cpp-python==$version" 2>/dev/null || true
sdist="$(ls "$work"/llama_cpp_python-*.tar.gz 2>/dev/null | head -1 || true)"
if [ -z "$sdist" ]; then
    url="$(curl -s "https://pypi.org/pypi/llama-cpp-python/json" | V="$version" python3 -c \
        "import json,os,sys,urllib.parse as u; d=json.load(sys.stdin); print(u.urljoin('https://pypi.org/pypi/llama-cpp-python/json', [f['url'] for f in d['releases'][os.environ['V']] if f['packagetype']=='sdist'][0]))")"
    sdist="$work/llama_cpp_python.tar.gz"
    curl -sL -o "$sdist" "$url"
fi
tar xzf "$sdist" -C "$work"
src="$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp)"
export PATH="$work/venv/bin:$PATH"
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build "$work/build" --target llama-server -j"$(nproc)"
mkdir -p "$out"
cp "$work/build/bin/llama-server" "$out/"
"$out/llama-server" --version
