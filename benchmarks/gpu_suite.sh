#!/usr/bin/env bash
# The GPU checks and the GPU benchmark in ONE call on a lent H100/H200, in at most ~9 minutes:
#
#   1. the GPU tests (pytest -m gpu tests/), capped at TEST_S seconds (default 150);
#   2. python -m benchmarks --preset gpu with the time left: cases are in priority order
#      (benchmarks/cases.py) and the ones not started in time are recorded as skipped;
#      the JSON is rewritten after every record, and the table and plot are rebuilt from it
#      even if the run is cut short.
#
# Raw output (at most 6 files) goes to $OUT when it is set (the device tool brings that folder
# back), else to benchmarks/results/. Peers travel as wheels in .whl/ (git-ignored), made
# here with the command in docs/benchmarks.md; without them liger and cce are recorded as
# skipped. The device machine's copy of the tree may have no .git: pass the commit, e.g.
#
#   run(command="ALPHAPO_COMMIT=$(git rev-parse --short=12 HEAD) bash benchmarks/gpu_suite.sh",
#       carry=[".whl"], timeout_s=600)
#
# (compose the hash here; the device tool runs the command there). Knobs: WALL_S (total
# seconds, default 540), TEST_S (GPU-test cap, default 150), PRESET (default gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
WALL_S=${WALL_S:-540}
TEST_S=${TEST_S:-150}
PRESET=${PRESET:-gpu}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no wheels in .whl/: liger and cce will be recorded as skipped"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    python3 -m pip list 2>/dev/null | grep -i -E "^(liger|cut.cross)" || true
    echo "commit ${ALPHAPO_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
} > "$DEST/gpu-env.txt" 2>&1
cat "$DEST/gpu-env.txt"

# 1. GPU tests
timeout "$TEST_S" python3 -m pytest -q -m gpu tests/ -p no:cacheprovider > "$DEST/gpu-tests.log" 2>&1
echo "gpu tests: exit $? after $((SECONDS - START)) s (124 = cut at ${TEST_S} s)" | tee -a "$DEST/gpu-tests.log"
tail -n 15 "$DEST/gpu-tests.log"

# 2. The benchmark. The budget stops new cases; the case in flight (compiles, a 16-pair
# sweep point) and the report need up to ~90 s more, and `timeout` is the hard stop.
LEFT=$((WALL_S - (SECONDS - START)))
BUDGET=$((LEFT - 90))
if [ "$BUDGET" -lt 60 ]; then BUDGET=60; fi
timeout "$((LEFT - 10))" python3 -m benchmarks --preset "$PRESET" --time-budget "$BUDGET" --out "$DEST" --no-progress \
    > "$DEST/bench.log" 2>&1
echo "benchmark: exit $? after $((SECONDS - START)) s (124 = cut by timeout)" | tee -a "$DEST/bench.log"
for json in "$DEST"/*.json; do
    [ -f "$json" ] || continue
    [ -f "${json%.json}.md" ] || python3 -m benchmarks --render "$json" >> "$DEST/bench.log" 2>&1
done
tail -n 25 "$DEST/bench.log"
