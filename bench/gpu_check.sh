#!/usr/bin/env bash
# GPU check for kvfast: one short script that fits one device call (about 8 minutes), tests first, then benchmarks.
#
#   bash bench/gpu_check.sh                # on the GPU machine (python3 is the interpreter that has the CUDA torch)
#   bash bench/gpu_check.sh --dry-run      # anywhere: every step but what needs a device (tests/test_gpu_check.py)
#   bash bench/gpu_check.sh --dry-run --no-build
#
# Steps, in order, each under its own time cap and all within one budget (KVFAST_GPU_CHECK_BUDGET seconds, default
# 480); a step that cannot have MIN_STEP_S seconds left is skipped with a line saying so:
#   build        KVFAST_REQUIRE_NATIVE=cuda pip install: fails unless nvcc is found and kvfast._C_cuda builds
#   gate         bench/gpu_gate.py: kvfast._C_cuda imports, sees a device, and its kernels run on it; a failed
#                build or gate stops the run (every CUDA test would skip, or test a stale build)
#   first-run    tests/test_gpu_first_run.py: the checks a review of the never-run CUDA path asked for
#   gpu-tests    every other GPU test
#   bench_*      the GPU benchmarks, each saving its JSON (bench/gpu_summary.py reads them for the last table)
#
# Output: everything goes under OUT_DIR = $KVFAST_BENCH_OUT, else $OUT (the device tool's folder, which sends back
# at most 8 files), else a fresh temp dir: gpu_check.log (every step's output, each under a header line),
# summary.txt (the tables printed last) and one JSON per benchmark. Exit status 1 when a step failed.
#
# --dry-run runs what needs no device, so that whatever would break the real run on a machine without one breaks
# here: setup.py evaluates, the gate's imports, pytest collects the GPU tests, each benchmark parses its arguments
# (--help after them), the summary reads an empty folder. --no-build also skips the build of a real run.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
BUILD=1
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --no-build) BUILD=0 ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--no-build]" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
BUDGET_S="${KVFAST_GPU_CHECK_BUDGET:-480}"
MIN_STEP_S=20
OUT_DIR="${KVFAST_BENCH_OUT:-${OUT:-$(mktemp -d -t kvfast-gpu-check.XXXXXX)}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1

# name | cap in seconds | command | its dry-run form ("-": none, the step only says it would run)
STEPS=(
  "build|180|env KVFAST_REQUIRE_NATIVE=cuda KVFAST_CUDA_ARCHS=\${KVFAST_CUDA_ARCHS:-90} $PY -m pip install -q --no-build-isolation --no-deps -e .|env KVFAST_REQUIRE_NATIVE=1 $PY setup.py -q --name"
  "gate|60|$PY bench/gpu_gate.py|$PY bench/gpu_gate.py --dry-run"
  "first-run|150|$PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_first_run.py|$PY -m pytest -q -m gpu -p no:cacheprovider --collect-only tests/test_gpu_first_run.py"
  "gpu-tests|150|$PY -m pytest -q -m gpu -p no:cacheprovider tests/ --ignore=tests/test_gpu_first_run.py --ignore=tests/vllm|$PY -m pytest -q -m gpu -p no:cacheprovider --collect-only tests/ --ignore=tests/test_gpu_first_run.py --ignore=tests/vllm"
  "bench_load_gpu|90|$PY bench/bench_load_gpu.py --repeat 5 --json $OUT_DIR/bench_load_gpu.json|+--help"
  "bench_kernels|60|$PY bench/bench_kernels.py --repeats 10 --json $OUT_DIR/bench_kernels.json|+--help"
  "prefill_vs_reuse|120|$PY -c 'import sys; from kvfast.cli import main; sys.exit(main())' bench qwen3-4b --device cuda --lengths 256,1024,4096 --skip-unavailable --no-progress --save $OUT_DIR/prefill_vs_reuse.json|+--help"
  "bench_codec_gpu|60|$PY bench/bench_codec.py --gpu-only --repeat 3 --json $OUT_DIR/bench_codec_gpu.json|+--help"
)
STOP_ON_FAILURE=" build gate "  # the steps whose failure makes every later step meaningless

NAMES=()
RESULTS=()
SECONDS_TAKEN=()
FAILED=0
STARTED=$SECONDS

record() {  # record NAME RESULT SECONDS
  NAMES+=("$1")
  RESULTS+=("$2")
  SECONDS_TAKEN+=("$3")
  printf '=== %s: %s (%s s)\n' "$1" "$2" "$3" | tee -a "$LOG"
}

# run_step NAME CAP COMMAND: COMMAND under `timeout`, its output appended to the log and shown; 0 if it passed.
run_step() {
  local name=$1 cap=$2 cmd=$3
  local left=$((BUDGET_S - (SECONDS - STARTED)))
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    record "$name" "skipped (budget: ${left} s left of ${BUDGET_S})" 0
    return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  printf '\n=== %s (cap %s s): %s\n' "$name" "$cap" "$cmd" | tee -a "$LOG"
  local start=$SECONDS
  timeout -k 10 "$cap" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  if [ "$rc" -eq 0 ]; then
    record "$name" ok "$took"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" "FAILED (over its cap of ${cap} s)" "$took"
    FAILED=1
  else
    record "$name" "FAILED (exit $rc)" "$took"
    FAILED=1
  fi
  return "$rc"
}

for entry in "${STEPS[@]}"; do
  IFS='|' read -r name cap cmd dry <<< "$entry"
  if [ "$DRY_RUN" -eq 1 ]; then
    case "$dry" in
      -) record "$name" "dry-run: not run" 0; continue ;;
      +*) cmd="$cmd ${dry#+}" ;;
      *) cmd=$dry ;;
    esac
  fi
  if [ "$name" = build ] && [ "$BUILD" -eq 0 ]; then
    record build "not run (--no-build)" 0
    continue
  fi
  if ! run_step "$name" "$cap" "$cmd" && [[ "$STOP_ON_FAILURE" == *" $name "* ]]; then
    echo "=== $name failed: the remaining steps would not test what they claim; stopping" | tee -a "$LOG"
    break
  fi
done

{
  echo
  gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
  echo "=== kvfast GPU check$([ "$DRY_RUN" -eq 1 ] && echo ' (dry run)') on ${gpu:-no GPU (nvidia-smi found none)};" \
    "$((SECONDS - STARTED)) s of a ${BUDGET_S} s budget; output in $OUT_DIR"
  printf '%-18s %-44s %8s\n' step result seconds
  for i in "${!NAMES[@]}"; do
    printf '%-18s %-44s %8s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}"
  done
  echo
  "$PY" bench/gpu_summary.py "$OUT_DIR"
} 2>&1 | tee "$OUT_DIR/summary.txt"
exit "$FAILED"
