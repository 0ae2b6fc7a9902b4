# Shared by the demo scripts (source it after setting OUT to an absolute directory): a copy of
# the binary (a rebuild during a run cannot change it half-way), BIN, LOG = OUT/demo.log, and
# `step NAME DONE_PATH COMMAND...`, which runs COMMAND unless DONE_PATH exists, logging the
# command and its wall time and keeping its stderr in OUT/NAME.err.
mkdir -p "$OUT"
[ -e "$OUT/lmforge" ] || cp target/release/lmforge "$OUT/lmforge"
BIN=$OUT/lmforge
LOG=$OUT/demo.log
step() { # name, output that marks it done, command...
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "# $name: done before" >> "$LOG"; return; fi
  echo "\$ $*" >> "$LOG"
  local t0=$(date +%s)
  "$@" 2> >(tee -a "$OUT/$name.err" >&2)
  echo "# $name: $(( $(date +%s) - t0 )) s" >> "$LOG"
}
echo "# $(date -u +%FT%TZ) lmforge $(git rev-parse --short HEAD)" >> "$LOG"
