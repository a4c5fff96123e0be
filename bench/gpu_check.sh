#!/usr/bin/env bash
# GPU check for kvfast: build with the CUDA parts, run the GPU tests, run the GPU benchmarks, print a summary.
#
#   bash bench/gpu_check.sh            # on the GPU machine, in the venv that has the CUDA torch
#
# Logs and each benchmark's JSON go to $KVFAST_BENCH_OUT (default: a fresh temp dir). The last thing printed is
# a short table: one row per step, its result and its time, then each benchmark's headline figure
# against its target (bench/gpu_summary.py). A failed build stops the run (the tests would test a
# stale build); failed tests or benchmarks do not stop the others, but the script then exits 1.
#
# To add a benchmark, append one line to BENCHES: a name, then the command (it should exit 0 without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${KVFAST_BENCH_OUT:-$(mktemp -d -t kvfast-gpu-check.XXXXXX)}"
mkdir -p "$OUT_DIR"

BENCHES=(
  "bench_kernels|python bench/bench_kernels.py --json $OUT_DIR/bench_kernels.json"
  "bench_load_gpu|python bench/bench_load_gpu.py --json $OUT_DIR/bench_load_gpu.json"
  "bench_codec_gpu|python bench/bench_codec.py --repeat 3 --json $OUT_DIR/bench_codec_gpu.json"
  "prefill_vs_reuse|kvfast bench qwen3-4b --device cuda --lengths 256,512,1024,2048,4096 --skip-unavailable --no-progress --save $OUT_DIR/prefill_vs_reuse.json"
)

STEP_NAMES=()
STEP_RESULTS=()
STEP_SECONDS=()
FAILED=0

# run_step NAME COMMAND...: runs COMMAND, tees its output to $OUT_DIR/NAME.log, records result and time.
run_step() {
  local name=$1
  shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  STEP_NAMES+=("$name")
  STEP_SECONDS+=($((SECONDS - start)))
  if [ "$rc" -eq 0 ]; then STEP_RESULTS+=("ok"); else STEP_RESULTS+=("FAILED ($rc)"); FAILED=1; fi
  return "$rc"
}

summary() {
  echo
  echo "=== kvfast GPU check ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)); logs in $OUT_DIR"
  printf '%-16s %-12s %8s\n' step result seconds
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-16s %-12s %8s\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "${STEP_SECONDS[$i]}"
  done
  echo
  python bench/gpu_summary.py "$OUT_DIR"
}

if ! run_step install env KVFAST_REQUIRE_NATIVE=1 pip install --no-build-isolation --no-deps -e .; then
  summary
  exit 1
fi
run_step tests python -m pytest -m gpu -q tests/
for entry in "${BENCHES[@]}"; do
  # shellcheck disable=SC2086  # the command is a word list on purpose
  run_step "${entry%%|*}" ${entry#*|}
done

summary
exit "$FAILED"
