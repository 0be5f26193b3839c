#!/usr/bin/env bash
# The whole GPU visit in one command, on a bare H100/H200 machine with its own python3 and no network
# (torch 2.11+cu130, triton 3.6, transformers 5.17, pytest-benchmark, matplotlib; no badam):
#
#   bash scripts/gpu_check.sh [--archive FILE.tgz] OUTDIR
#   bash scripts/gpu_check.sh --cpu-dry-run OUTDIR     here, without a GPU: every part, tiny sizes
#
# Before the visit, run scripts/prepare_gpu_visit.sh here (the badam wheel into .gpu_visit/). Through
# the device tool, which brings back at most 8 files of $OUT, so everything comes back as one archive:
#   run(command="bash scripts/gpu_check.sh --archive $OUT/gpu_check.tgz /tmp/gpu_check",
#       carry=[".gpu_visit"], timeout_s=540)
#
# Parts, in order, each time-boxed with `timeout`; a failing part does not stop the rest. Seconds on
# one H100/H200 with 16 cores (estimate, cap):
#   build           100  240  pip install -e . for this GPU's arch (MAX_JOBS = cores), badam wheel
#   check            50  120  python -m badam_kernels.check --require cuda triton, 2^24 and 2^27
#   tests            60  150  CUDA and Triton kernel tests on the GPU, Triton launch/recompile tests
#   sanitizer        45   90  compute-sanitizer memcheck on the cuda and triton kernels (if installed)
#   kernel_table     15   45  bench/kernel_table.py 2^24 2^27 (CUDA events) + PNG
#   e2e_step         25   90  bench/e2e_step.py, 1.1B Llama: BlockAdamW vs badam vs torch AdamW(fused)
#   bench_pytest     20   60  bench/test_bench_kernels.py (pytest-benchmark, CUDA-synchronised rounds)
#   tiling           25   60  bench/triton_tiling.py: the Triton kernel's GB/s per tiling at 2^27
#   optimizer_step   15   45  bench/optimizer_step.py
#   host_time        10   30  bench/triton_host_time.py: host time per Triton call, 7B-layer blocks
#   frontier         60  150  bench/memory_frontier.py, Llama-3-8B shape, 24 GB (if the file exists)
#   total           425       each part after the build also stops early enough to leave every later
#                             part its estimate before DEADLINE_SECONDS (470), and parts that find no
#                             time left are skipped: the script ends within 8 minutes.
# OUTDIR gets one log per part, summary.md (status and time of every part, the tables), PNGs, JSON.
# Environment: PYTHON (default python3; .venv/bin/python for the dry run), FRONTIER_ARGS,
# DRY_RUN_SLOWER (the dry run's caps and deadline are this many times longer, default 6).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=""
ARCHIVE=""
while [ $# -gt 1 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1; shift ;;
    --archive) ARCHIVE=$2; shift 2 ;;
    *) break ;;
  esac
done
if [ $# -ne 1 ]; then
  echo "usage: $0 [--cpu-dry-run] [--archive FILE.tgz] OUTDIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
if [ -n "$DRY" ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PY OUT DRY PYTHONUNBUFFERED=1
DEADLINE_SECONDS=${DEADLINE_SECONDS:-470}
# The dry run checks that every part runs, not that it fits 8 minutes: a shared CPU is slower.
SLOWER=1
[ -n "$DRY" ] && SLOWER=${DRY_RUN_SLOWER:-6}
START=$(date +%s)
# name:estimate:cap, in the order the parts run.
PARTS=(build:100:240 check:50:120 tests:60:150 sanitizer:45:90 kernel_table:15:45 e2e_step:25:90
       bench_pytest:20:60 tiling:25:60 optimizer_step:15:45 host_time:10:30 frontier:60:150)

part_build() {
  if [ -z "$DRY" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
  fi
  MAX_JOBS=$(nproc)
  export MAX_JOBS
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS"
  "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . || return 1
  local wheels=(.gpu_visit/badam-*.whl)
  if [ -e "${wheels[0]}" ]; then
    "$PY" -m pip install --no-index --no-deps "${wheels[@]}" || return 1
  else
    echo "no badam wheel in .gpu_visit/ (run scripts/prepare_gpu_visit.sh and carry .gpu_visit)"
  fi
  "$PY" -c "import badam_kernels as b; print({d: b.available_backends(d) for d in ('cpu', 'cuda')})"
}

part_check() {
  if [ -n "$DRY" ]; then
    "$PY" -m badam_kernels.check --require cpu triton --bench-cpu --sizes 12 --min-time 0
  else
    "$PY" -m badam_kernels.check --require cuda triton --sizes 24 27
  fi
}

part_tests() {
  "$PY" -m pytest -q -p no:cacheprovider tests -k "cuda- or compiled_cuda or triton_launch"
}

part_sanitizer() {
  if ! command -v compute-sanitizer > /dev/null; then
    echo "skipped: compute-sanitizer is not on the PATH"
    return 0
  fi
  # Both kernels on tensors of odd sizes, one misaligned, every master mode: memcheck reports any
  # out-of-bounds or misaligned access.
  compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" - << 'EOF'
import torch
import badam_kernels

for backend in ("cuda", "triton"):
    for dtype, mode in [(torch.bfloat16, "remainder"), (torch.bfloat16, "fp32"), (torch.bfloat16, "none"),
                        (torch.float16, "fp32"), (torch.float32, "none")]:
        sizes = [1, 3, 1023, 70001, 5]
        def make(n, dt, misaligned):
            return torch.zeros(n + misaligned, dtype=dt, device="cuda")[misaligned:].normal_()
        params = [make(n, dtype, i == 3) for i, n in enumerate(sizes)]
        grads = [make(n, dtype, i == 3) for i, n in enumerate(sizes)]
        m = [make(n, torch.float32, i == 3).abs_() for i, n in enumerate(sizes)]
        v = [make(n, torch.float32, i == 3).abs_() for i, n in enumerate(sizes)]
        master_dtype = torch.int16 if mode == "remainder" else torch.float32
        masters = None if mode == "none" else [torch.zeros(n, dtype=master_dtype, device="cuda") for n in sizes]
        badam_kernels.fused_adamw_(params, grads, m, v, lr=1e-3, step=1, master_weights=mode, masters=masters,
                                   grad_mul=torch.tensor(0.5, device="cuda"), backend=backend)
        badam_kernels.grad_norm(grads, backend=backend)
    torch.cuda.synchronize()
    print(backend, "ran under memcheck")
EOF
}

part_bench_pytest() {
  local sizes=""
  [ -n "$DRY" ] && sizes=12
  BADAM_KERNELS_BENCH_LOG2_SIZES=$sizes "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_kernels.py \
    --benchmark-only --benchmark-json "$OUT/bench_kernels.json" --benchmark-columns=median,rounds
}

part_kernel_table() {
  if [ -n "$DRY" ]; then
    "$PY" bench/kernel_table.py --sizes 12 --min-time 0 --png "$OUT/kernel_table.png"
  else
    "$PY" bench/kernel_table.py --sizes 24 27 --min-time 0.3 --png "$OUT/kernel_table.png"
  fi
}

part_tiling() {
  if [ -n "$DRY" ]; then
    "$PY" bench/triton_tiling.py --sizes 12 --min-time 0 --tilings 1024x8 4096x8
  else
    "$PY" bench/triton_tiling.py --sizes 27 --tilings 1024x8 2048x8 1024x4 4096x8
  fi
}

part_host_time() {
  "$PY" bench/triton_host_time.py
}

part_optimizer_step() {
  if [ -n "$DRY" ]; then
    "$PY" bench/optimizer_step.py --layers 2 --hidden 64 --reps 2
  else
    "$PY" bench/optimizer_step.py
  fi
}

part_e2e_step() {
  local size=(--model 1b)
  [ -n "$DRY" ] && size=(--model tiny --batch 2 --seq 32 --warmup 1 --steps 2)
  "$PY" bench/e2e_step.py "${size[@]}" --png "$OUT/e2e_step.png" --json "$OUT/e2e_step.json"
}

part_frontier() {
  if [ ! -f bench/memory_frontier.py ]; then
    echo "skipped: bench/memory_frontier.py does not exist"
    return 0
  fi
  # Peak memory and fit at two fixed lengths (4096 and 8192 tokens) per method, Llama-3-8B shape,
  # 24 GB budget: the full frontier search (the command in bench/memory_frontier.py's docstring)
  # takes longer than this part's cap; FRONTIER_ARGS overrides.
  local args=${FRONTIER_ARGS:---shape llama3-8b --budget-gb 24 --device cuda --min-seq 4096 --max-seq 8192 \
    --resolution 1.0 --time-limit 60 --out-dir $OUT/frontier}
  [ -n "$DRY" ] && args=${FRONTIER_ARGS:---shape proxy --budget-gb 1 --device cpu --min-seq 256 --max-seq 512 \
    --resolution 1.0 --time-limit 60 --out-dir $OUT/frontier}
  # shellcheck disable=SC2086  # the arguments are meant to be split
  "$PY" bench/memory_frontier.py $args
}

export -f part_build part_check part_tests part_sanitizer part_bench_pytest part_kernel_table \
  part_tiling part_host_time part_optimizer_step part_e2e_step part_frontier

estimate_after() {  # the summed estimates of the parts after $1
  local seen="" total=0 entry
  for entry in "${PARTS[@]}"; do
    IFS=: read -r name estimate _ <<< "$entry"
    [ -n "$seen" ] && total=$((total + estimate))
    [ "$name" = "$1" ] && seen=1
  done
  echo "$total"
}

STATUS_ROWS=()
run_part() {  # name estimate cap
  local name=$1 estimate=$2 cap=$(($3 * SLOWER))
  local reserve=$(($(estimate_after "$name") * SLOWER))
  # The build is never cut short to leave time for later parts: they need what it builds.
  [ "$name" = build ] && reserve=0
  local left=$((START + DEADLINE_SECONDS * SLOWER - $(date +%s) - reserve))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 5 ]; then
    STATUS_ROWS+=("| $name | skipped: no time left | 0 | $estimate | - |")
    return
  fi
  echo "== $name (estimate ${estimate} s, limit ${limit} s)"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "part_$name" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${limit} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  grep -q "^skipped:" "$OUT/$name.log" && [ $rc -eq 0 ] && status=$(grep -m1 "^skipped:" "$OUT/$name.log")
  STATUS_ROWS+=("| $name | $status | $(($(date +%s) - t0)) | $estimate | $name.log |")
  echo "   $status"
}

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2> /dev/null \
    || echo "no nvidia-smi"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  "$PY" -m pip list 2> /dev/null | grep -i -E "^(triton|numpy|transformers|accelerate|peft|badam) "
  nproc
} > "$OUT/environment.txt" 2>&1

for entry in "${PARTS[@]}"; do
  IFS=: read -r name estimate cap <<< "$entry"
  run_part "$name" "$estimate" "$cap"
done

tables() {  # the markdown table lines and headings of a log
  grep -E "^\||^device=|^Llama" "$1"
}
section() {  # a heading, then what the command prints (nothing if its log is missing)
  echo
  echo "## $1"
  shift
  "$@" 2> /dev/null
}
{
  echo "# GPU check, $(head -n 1 "$OUT/environment.txt")${DRY:+ (CPU dry run)}"
  echo
  echo '```'
  tail -n +2 "$OUT/environment.txt"
  echo '```'
  echo
  echo "| part | status | seconds | estimate | log |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${STATUS_ROWS[@]}"
  echo
  echo "Total: $(($(date +%s) - START)) s"
  echo
  section "check (correctness; its throughput table is the kernel table below)" \
    grep -v -E "^\| 2\^|^\| elements|^\|---\|---\|---\|---\|---\|---" "$OUT/check.log"
  section tests grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$OUT/tests.log"
  section sanitizer tail -n 5 "$OUT/sanitizer.log"
  section "kernel table" tables "$OUT/kernel_table.log"
  section "Triton tiling" tables "$OUT/tiling.log"
  section "host time per Triton call" tables "$OUT/host_time.log"
  section "optimizer step" tables "$OUT/optimizer_step.log"
  section "end-to-end step" tables "$OUT/e2e_step.log"
  section frontier tail -n 25 "$OUT/frontier.log"
  section "pytest-benchmark (GB/s in bench_kernels.json)" tail -n 1 "$OUT/bench_pytest.log"
  for row in "${STATUS_ROWS[@]}"; do
    case "$row" in
      *FAILED* | *TIMEOUT*)
        name=$(echo "$row" | cut -d'|' -f2 | tr -d ' ')
        section "$name: last lines of the log" tail -n 20 "$OUT/$name.log"
        ;;
    esac
  done
} > "$OUT/summary.md"

if [ -n "$ARCHIVE" ]; then
  tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")"
fi
cat "$OUT/summary.md"
case "${STATUS_ROWS[*]}" in
  *FAILED* | *TIMEOUT*) exit 1 ;;
esac
