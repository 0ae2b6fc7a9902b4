#!/usr/bin/env bash
# Fuzz lmforge's parsers with cargo-fuzz (libFuzzer): each target runs SECONDS (default 600)
# on one core, its corpus seeded from fuzz/seeds and the test fixtures; executions, coverage
# and findings are printed and appended to docs/fuzzing.md. Not part of CI.
#   cargo install cargo-fuzz   (needs the nightly toolchain: rustup toolchain install nightly)
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(gguf safetensors tokenizer_json chat_template recipe jsonl)
cargo +nightly fuzz build -O 2>&1 | tail -1
corpus=target/fuzz-corpus
for t in "${targets[@]}"; do
  mkdir -p "$corpus/$t" "fuzz/artifacts/$t"
  [ -d "fuzz/seeds/$t" ] && cp -n fuzz/seeds/"$t"/* "$corpus/$t/" 2>/dev/null || true
  case $t in
    gguf) cp -n tests/fixtures/gguf/*.gguf "$corpus/$t/" ;;
    safetensors) cp -n tests/fixtures/llama_tiny/model.safetensors "$corpus/$t/llama_tiny.safetensors"
                 cp -n tests/fixtures/gpt2_tiny/model.safetensors "$corpus/$t/gpt2_tiny.safetensors" ;;
    tokenizer_json) for d in tests/fixtures/*/; do [ -f "$d/tokenizer.json" ] && cp -n "$d/tokenizer.json" "$corpus/$t/$(basename "$d").json"; done ;;
    jsonl) cp -n data/sft/*.jsonl "$corpus/$t/" 2>/dev/null || true ;;
  esac
  log=target/fuzz-$t.log
  start=$(date -u +%FT%TZ); t0=$(date +%s)
  # -rss_limit_mb: an input that makes a parser allocate past 2 GiB is a finding.
  cargo +nightly fuzz run -O "$t" "$corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
     -timeout=20 -max_len=262144 -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1 || true
  took=$(( $(date +%s) - t0 ))
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
  found=$(ls "fuzz/artifacts/$t" 2>/dev/null | wc -l)
  # libFuzzer stops at its first finding: then the time is shorter than asked.
  line="| $start | $t | ${took}s | ${execs:-?} | ${cov:-?} | $found |"
  echo "$line"
  echo "$line" >> docs/fuzzing.md
done
