#!/usr/bin/env bash
# The long reliability runs of docs/reliability.md, one after the other:
#   tests/test_fuzz.py          ATTNC_LONG=1: >= 10 000 parser / elaborator cases
#   tests/test_differential.py  ATTNC_LONG=1: >= 1 000 random patterns through every backend and the flex export
#   tests/test_hostile.py       ATTNC_LONG=1: >= 20 000 hostile cases (random programs against an oracle, a
#                               catalogue of pathological inputs), in-process and through the CLI
# Prints each suite's counts line, its pytest summary and its wall time; exits 1 if any suite failed.
#
#   scripts/long_run.sh                     # all three suites
#   scripts/long_run.sh differential        # one suite (fuzz | differential | hostile)
#   ATTNC_SEED=100000 scripts/long_run.sh differential   # another slice of differential seeds
#   ATTNC_LONG= scripts/long_run.sh         # the CI subsets through the same driver (a smoke test)
set -uo pipefail
cd "$(dirname "$0")/.."
export ATTNC_LONG="${ATTNC_LONG-1}"
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
suites=("$@")
[ ${#suites[@]} -eq 0 ] && suites=(fuzz differential hostile)
log_dir=$(mktemp -d)
status=0
summary=()
for suite in "${suites[@]}"; do
  case "$suite" in
    fuzz|differential|hostile) ;;
    *) echo "long_run.sh: expected a suite name, fuzz, differential or hostile, got '$suite'" >&2; exit 2 ;;
  esac
  log="$log_dir/$suite.log"
  echo "== ATTNC_LONG=$ATTNC_LONG tests/test_$suite.py (seed base ${ATTNC_SEED:-0}; log $log)"
  start=$(date +%s)
  "$PY" -m pytest -q -p no:cacheprovider "tests/test_$suite.py" >"$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  [ $rc -ne 0 ] && status=1
  counts=$(grep -E "^(\.|F|s|E)*(fuzz|differential|hostile)[^ ]*: " "$log" | sed -E 's/^[.FsE]*//' | tail -n 1)
  result=$(grep -E "[0-9]+ (passed|failed)" "$log" | tail -n 1)
  summary+=("${counts:-$suite: no counts line (see $log)} | ${result:-no pytest summary} | ${secs} s")
  if [ $rc -ne 0 ]; then
    grep -E "differential failure|minimal snippet|^# M=|^pattern |Mismatch|hostile failures|^E +\[|FAILED" "$log" | head -n 40
  fi
done
echo
echo "== long runs ($(date -u +%Y-%m-%d), $(nproc) CPUs, $("$PY" -c 'import torch; print("torch", torch.__version__)'))"
printf '%s\n' "${summary[@]}"
exit $status
