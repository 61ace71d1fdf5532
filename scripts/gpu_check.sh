#!/usr/bin/env bash
# The one script of a device run (run from the repo root, $OUT set, ~420 s wall at most):
# installs the carried lark wheel and attnc (editable), prints the versions, runs the
# @gpu tests (every example forward + backward in fp16 / bf16, the codegen and N-D tile
# GPU tests) and the issue-23 benchmark subset under a total budget. Every stage has
# its own `timeout`; the benchmark rewrites its markdown / JSON after every case, so a
# stage cut short still leaves what it measured under $OUT.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh
# Needs .whl/lark-*.whl (ignored by git: carry it) where lark is not installed.
set -u
: "${OUT:?set OUT to the folder for the logs and results}"
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
PY=${PYTHON:-python3}
PYTEST_S=${PYTEST_S:-190}    # stage limits, seconds (sum + installs stays under ~420)
BENCH_S=${BENCH_S:-230}      # hard limit of the benchmark process
BUDGET_S=${BUDGET_S:-205}    # the benchmark's own budget: it stops starting steps and writes its results
AOT_S=${AOT_S:-0}            # > 0: also check AOT compilation against real launches (scripts/aot_gpu_check.py)
LENGTHS_S=${LENGTHS_S:-0}    # > 0: also time many sequence lengths (benchmarks/lengths.py, issue 16)
PYTEST_ARGS=${PYTEST_ARGS:--m gpu}              # which tests (a follow-up run narrows them)
LENGTHS_ARGS=${LENGTHS_ARGS:---count 6 --min 4096 --max 32768 --heads 16 --dim 128 --repeat 5}
BENCH_ARGS=${BENCH_ARGS:---subset issue23}      # which benchmark cases and options

{
stamp "install"
if ls .whl/*.whl >/dev/null 2>&1; then
    timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# attnc maps codegen/ runtime/ grammar/ into its namespace (pyproject): an editable install,
# else (no setuptools / no pip) the same layout as symlinks on PYTHONPATH
if ! timeout 90 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . ; then
    stamp "editable install failed: symlinked package on PYTHONPATH instead"
    rm -rf /tmp/attnc-pkg && mkdir -p /tmp/attnc-pkg/attnc
    for f in attnc/*; do ln -s "$PWD/$f" /tmp/attnc-pkg/attnc/; done
    for d in codegen runtime grammar; do ln -sfn "$PWD/$d" /tmp/attnc-pkg/attnc/$d; done
    export PYTHONPATH=/tmp/attnc-pkg:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | head -5
$PY - <<'PY'
import platform, torch, triton, lark, attnc
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__, "| lark", lark.__version__, "| attnc", attnc.__version__, attnc.__file__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY
} 2>&1 | tee "$OUT/setup.log"
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/attnc-pkg ] && export PYTHONPATH=/tmp/attnc-pkg:$PYTHONPATH

stamp "pytest $PYTEST_ARGS (limit ${PYTEST_S} s)" | tee -a "$OUT/setup.log"
export LIVE_FAILURES="$OUT/failures.log" PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
timeout -k 10 "$PYTEST_S" $PY -m pytest $PYTEST_ARGS -p live_failures -q --maxfail=40 -n 14 --timeout 300 -p no:cacheprovider -rfEs --durations=15 \
    2>&1 | tee "$OUT/pytest.log"
echo "pytest exit ${PIPESTATUS[0]} (124: stage limit)" | tee -a "$OUT/pytest.log"

if [ "$AOT_S" -gt 0 ]; then
    stamp "AOT vs real launches (limit ${AOT_S} s)" | tee -a "$OUT/setup.log"
    timeout -k 5 "$AOT_S" $PY scripts/aot_gpu_check.py 2>&1 | tee "$OUT/aot_check.log"
    echo "aot check exit ${PIPESTATUS[0]} (124: stage limit)" | tee -a "$OUT/aot_check.log"
fi

if [ "$LENGTHS_S" -gt 0 ]; then
    stamp "lengths $LENGTHS_ARGS (limit ${LENGTHS_S} s)" | tee -a "$OUT/setup.log"
    timeout -k 5 "$LENGTHS_S" $PY benchmarks/lengths.py --device cuda $LENGTHS_ARGS --out "$OUT/lengths_gpu.md" \
        2>&1 | tee "$OUT/lengths.log"
    echo "lengths exit ${PIPESTATUS[0]} (124: stage limit)" | tee -a "$OUT/lengths.log"
fi

stamp "benchmark $BENCH_ARGS (budget ${BUDGET_S} s, limit ${BENCH_S} s)" | tee -a "$OUT/setup.log"
timeout -k 10 "$BENCH_S" $PY benchmarks/gpu.py $BENCH_ARGS --budget-s "$BUDGET_S" --warmup 2 --reps 7 \
    --out "$OUT/gpu_h200.md" --json "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
echo "benchmark exit ${PIPESTATUS[0]} (124: stage limit)" | tee -a "$OUT/bench.log"
stamp "done" | tee -a "$OUT/setup.log"
