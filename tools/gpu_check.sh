#!/usr/bin/env bash
# fastcram's one-shot GPU check: run it from a checkout on any CUDA machine (a lent one, or yours).
#
#   bash tools/gpu_check.sh            # about 8 minutes: GPU tests, kernel benchmarks (with the peers: Liger-Kernel,
#                                      # QuACK where installed, apex where built), the step benchmark's main variants
#                                      # (fastcram as tuned, cramming's torch way, HF, Liger; then residual dtype,
#                                      # CUDA graphs, attention), a 2-minute train
#   bash tools/gpu_check.sh --dry-run  # no GPU needed: runs every stage's command in its CPU/--help form and
#                                      # writes the report skeleton, so the script itself is tested anywhere
#
# Writes into $OUT when set, else ./gpu_check_out: report.md, kernels.csv, step.csv, compile.csv,
# train_log.jsonl, telemetry.jsonl (when training wrote one), nvidia_smi.csv and stages.log (every stage's full
# output): 8 files at most, so a lent machine hands them all back. The short summary table is printed last.
#
# Stages run on a fixed schedule: each must end by its deadline (time a stage leaves unused passes to the
# next), so the whole check ends in about 8 minutes. A failing or timed-out stage does not stop the later
# ones; its exit code and the tail of its output go into the report. While the GPU tests run, the built-in
# corpus is prepared (CPU) and the native CUDA kernels are built when cmake and nvcc exist (background); while
# the training stage runs, `fastcram bench compile --check-driver` compiles every Triton kernel for this GPU's
# architecture as the CPU report does and loads each into the driver, whose registers and spills must agree.
#
# Nothing is installed: the checkout is used through PYTHONPATH with $PYTHON (default python3), which needs
# torch, triton, numpy, tokenizers and pytest (pytest-benchmark, rich, transformers, nvidia-ml-py are used
# when present). Wheels of missing pure-Python packages in $GPU_CHECK_WHEELS (default ./.whl) are unpacked
# into a scratch folder and put on the path first: `bash tools/fetch_wheels.sh` fills it with the peers'
# (Liger-Kernel); the report's environment block names the wheels used and every peer's version.
# Seconds per stage, to override: GPU_CHECK_T_TESTS=60 GPU_CHECK_T_KERNELS=120 GPU_CHECK_T_STEP=170
# GPU_CHECK_T_TRAIN=135; GPU_CHECK_TRAIN_MINUTES=2 (the training budget). With 10 s of set-up: 495 s.
# The step variants run in order of importance (each compiles its own graph; rows are written as each
# finishes); GPU_CHECK_STEP_VARIANTS overrides them. Compile caches go to the cache folder ($FASTCRAM_CACHE),
# so a second check compiles faster.
set -u

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python3}
T_TESTS=${GPU_CHECK_T_TESTS:-60}
T_KERNELS=${GPU_CHECK_T_KERNELS:-120}
T_STEP=${GPU_CHECK_T_STEP:-170}
# fastcram against its peers first (cramming's torch way, HF, Liger), then fastcram's own switches
STEP_VARIANTS=${GPU_CHECK_STEP_VARIANTS:-"fastcram torch hf liger kernels=triton+compile_mode=reduce-overhead kernels=triton+residual=bf16 kernels=triton+attention=cudnn"}
T_TRAIN=${GPU_CHECK_T_TRAIN:-135}
TRAIN_MINUTES=${GPU_CHECK_TRAIN_MINUTES:-2}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}

mkdir -p "$OUT_DIR" || { echo "gpu_check.sh: cannot create the output folder $OUT_DIR" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR"/report.md "$OUT_DIR"/kernels.csv "$OUT_DIR"/step.csv "$OUT_DIR"/compile.csv \
      "$OUT_DIR"/train_log.jsonl "$OUT_DIR"/telemetry.jsonl "$OUT_DIR"/nvidia_smi.csv "$OUT_DIR"/stages.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
: > "$WORK/stages.tsv"

BG_PIDS=()
cleanup() {
  for pid in ${BG_PIDS[@]+"${BG_PIDS[@]}"}; do kill "$pid" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT

cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the check times real kernels; the CPU interpreter is only for tests
FASTCRAM=("$PY" -m fastcram)
TIMEOUT=$(command -v timeout || true)
START=$(date +%s)
PLAN=10  # seconds from START at which the next stage must end; the first 10 s are the set-up below

say() { echo "gpu_check: $*"; }

# ---------------------------------------------------------------- set-up checks

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check.sh: '$PY' cannot import torch; set PYTHON to the interpreter that has torch and triton" >&2
  exit 2
fi
if [ "$DRY" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA GPU is visible to $PY (torch.cuda.is_available() is False);" \
       "use --dry-run to validate the commands without one" >&2
  exit 2
fi
WHEELS_USED="none (no .whl files in $WHEELS; bash tools/fetch_wheels.sh fetches the peers')"
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  say "installing the wheels in $WHEELS into a scratch folder: $(cd "$WHEELS" && ls ./*.whl | sed 's|^\./||' | tr '\n' ' ')"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
    "$WHEELS"/*.whl; then
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
    WHEELS_USED="$(cd "$WHEELS" && ls ./*.whl | sed 's|^\./||' | tr '\n' ' ')(from $WHEELS, first on the path)"
  else
    WHEELS_USED="FAILED to install the wheels in $WHEELS (see above); the peers that need them show as unavailable"
  fi
fi

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')   mode: $([ "$DRY" = 1 ] && echo dry-run || echo full)"
  echo "host: $(uname -srm), $(nproc 2>/dev/null || echo '?') CPU cores"
  echo "wheels used: $WHEELS_USED"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'EOF' 2>&1
import importlib, json, sys
import torch
from fastcram.observe.env_info import environment
print("python", sys.version.split()[0], sys.executable)
print(json.dumps(environment("cuda" if torch.cuda.is_available() else "cpu")))
from importlib import metadata
for name, dist in (("triton", "triton"), ("transformers", "transformers"), ("rich", "rich"),
                   ("pytest_benchmark", "pytest-benchmark"), ("pynvml", "nvidia-ml-py"), ("tokenizers", "tokenizers"),
                   ("liger_kernel", "liger-kernel"), ("quack", "quack-kernels"), ("apex", "apex")):
    try:
        mod = importlib.import_module(name)
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = getattr(mod, "__version__", "present")
        print(f"{name}: {version} ({getattr(mod, '__file__', '?')})")
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__})")
EOF
  echo "nvcc: $(command -v nvcc >/dev/null && nvcc --version | tail -n 1 || echo 'not found')"
  echo "cmake: $(command -v cmake >/dev/null && cmake --version | head -n 1 || echo 'not found')"
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

# ---------------------------------------------------------------- stages

# stage NAME SECONDS NOTE CMD...: run CMD with a deadline SECONDS after the previous stage's, log it, record it.
stage() {
  local name=$1 planned=$2 note=$3
  shift 3
  PLAN=$((PLAN + planned))
  local limit=$((START + PLAN - $(date +%s)))
  [ "$limit" -lt 20 ] && limit=20  # a stage that starts late still gets a chance
  run_stage "$name" "$limit" "$note" show "$@"
}

# run_stage NAME LIMIT NOTE show|quiet CMD...
run_stage() {
  local name=$1 limit=$2 note=$3 mode=$4
  shift 4
  local log="$WORK/$name.log" t0 rc secs
  [ "$mode" = show ] && say "stage $name (limit ${limit}s): $*"
  t0=$(date +%s)
  if [ "$mode" = show ]; then
    if [ -n "$TIMEOUT" ]; then "$TIMEOUT" -k 10 "$limit" "$@" < /dev/null 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
    else "$@" < /dev/null 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}; fi
  else
    if [ -n "$TIMEOUT" ]; then "$TIMEOUT" -k 10 "$limit" "$@" < /dev/null > "$log" 2>&1; rc=$?
    else "$@" < /dev/null > "$log" 2>&1; rc=$?; fi
  fi
  secs=$(($(date +%s) - t0))
  [ "$rc" = 124 ] && note="timed out after ${limit}s${note:+; $note}"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" "$*" "$note" >> "$WORK/stages.tsv"
  { echo "===== $name: exit $rc after ${secs}s (limit ${limit}s): $*"; cat "$log"; echo; } >> "$OUT_DIR/stages.log"
  [ "$mode" = show ] && say "stage $name: exit $rc after ${secs}s"
  return 0
}

skip_stage() {  # skip_stage NAME WHY
  printf '%s\t-\t0\t0\t-\t%s\n' "$1" "$2" >> "$WORK/stages.tsv"
  echo "$2" > "$WORK/$1.log"
}

if [ "$DRY" = 1 ]; then
  # The same stages in the forms that need no GPU: collection, --help, tiny CPU runs.
  run_stage data-prep 60 "dry run: module found, nothing prepared" quiet \
    "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('fastcram.data.loader') is None)"
  if command -v cmake >/dev/null; then
    run_stage native-build 60 "dry run: cmake --version only" quiet cmake --version
  else
    skip_stage native-build "cmake not found: the 'cuda' provider would show as unavailable"
  fi
  stage gpu-tests "$T_TESTS" "dry run: collection only" \
    "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests
  stage bench-kernels "$T_KERNELS" "dry run: CPU, only cases predicted under 10 ms a call" \
    "${FASTCRAM[@]}" bench kernels --quick --device cpu --cpu-call-limit 0.01 --plain \
    --skip-providers torch.compile-max-autotune --csv "$OUT_DIR/kernels.csv"
  # the GPU variants with what a CPU lacks swapped for CPU values: eager, math attention, bf16 autocast
  stage bench-step "$T_STEP" "dry run: tiny preset on the CPU, eager" \
    "${FASTCRAM[@]}" bench step --device cpu --preset tiny --micro-batch 2 --steps 1 --warmup 1 --repeats 3 \
    --plain --csv "$OUT_DIR/step.csv" --variants fastcram torch hf liger triton \
    kernels=torch+autocast=bf16+residual=bf16 kernels=torch+attention=math
  run_stage compile-check 300 "dry run: one op's kernels compiled for sm_90a on the CPU, no driver" quiet \
    "${FASTCRAM[@]}" bench compile --arch 90a --ops mlm_loss --micro-batches 32 --native-lib "" --plain \
    --csv "$OUT_DIR/compile.csv"
  stage train "$T_TRAIN" "dry run: --help only" "${FASTCRAM[@]}" train --help
else
  # GPU telemetry for the whole check, whatever fastcram itself records.
  if command -v nvidia-smi >/dev/null; then
    fields="timestamp,utilization.gpu,utilization.memory,memory.used,power.draw,clocks.sm,clocks.mem,temperature.gpu"
    for reasons in clocks_event_reasons.active clocks_throttle_reasons.active; do  # newer, older drivers
      if nvidia-smi --query-gpu="$fields,$reasons" --format=csv >/dev/null 2>&1; then
        fields="$fields,$reasons"
        break
      fi
    done
    nvidia-smi --query-gpu="$fields" --format=csv,nounits -l 1 > "$OUT_DIR/nvidia_smi.csv" 2>/dev/null &
    BG_PIDS+=($!)
  fi
  # CPU work in the background while the GPU tests run: the corpus for the training stage, the native build.
  run_stage data-prep 300 "built-in corpus, vocabulary 32768 (outside the training budget)" quiet \
    "$PY" -c "from fastcram.data.builtin import builtin_data; builtin_data(32768, progress=False)" &
  DATA_PID=$!
  BG_PIDS+=($DATA_PID)
  NATIVE_PID=
  if command -v cmake >/dev/null && command -v nvcc >/dev/null; then
    # built for this GPU's own architecture (e.g. 90 on an H100/H200), whatever CMakeLists.txt defaults to
    arch=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 90)
    run_stage native-build 100 "kernels/ -> build/ for the 'cuda' provider, sm_$arch" quiet bash -c \
      "cmake -S '$REPO' -B '$REPO/build' -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=$arch \
       && cmake --build '$REPO/build' --parallel" &
    NATIVE_PID=$!
    BG_PIDS+=($NATIVE_PID)
  else
    skip_stage native-build "cmake or nvcc not found: the 'cuda' provider shows as unavailable"
  fi

  # one line per test, so a stage cut by its limit still shows which tests passed; xdist, when installed,
  # compiles in 4 processes at once
  PARALLEL=()
  if "$PY" -c "import xdist" 2>/dev/null; then PARALLEL=(-n 4); fi
  # the new kernels' numerics and the step's CUDA-graph path first, so a stage cut by its limit has run those
  # (pytest keeps the order of the files it is given and drops the repeats of the glob)
  GPU_TEST_FILES=(tests/test_ffn.py tests/test_mlm_loss.py tests/test_layer_norm.py tests/test_step_switches.py
                  tests/test_*.py)
  stage gpu-tests "$T_TESTS" "${PARALLEL[*]:-one process}" "$PY" -m pytest -m gpu -v --tb=short -rfEs \
    --durations=10 -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} "${GPU_TEST_FILES[@]}"
  [ -n "$NATIVE_PID" ] && wait "$NATIVE_PID"
  # max-autotune takes minutes to build per shape: left out of the quick check
  stage bench-kernels "$T_KERNELS" "rows are written as each case finishes" \
    "${FASTCRAM[@]}" bench kernels --quick --plain --skip-providers torch.compile-max-autotune \
    --csv "$OUT_DIR/kernels.csv"
  # shellcheck disable=SC2086  # the variants are words
  stage bench-step "$T_STEP" "synthetic data; main variants in order, each compiled" \
    "${FASTCRAM[@]}" bench step --steps 10 --warmup 3 --plain --csv "$OUT_DIR/step.csv" --variants $STEP_VARIANTS
  wait "$DATA_PID"
  # CPU work beside the training stage (not beside the timed benchmarks): the compile report for this GPU's
  # architecture, every kernel then loaded into the driver, whose registers and spills must equal the report's
  COMPILE_ARCH=$("$PY" -c "import torch; print({(9, 0): '90a', (8, 0): '80'}.get(torch.cuda.get_device_capability(), ''))" 2>/dev/null)
  COMPILE_PID=
  if [ -n "$COMPILE_ARCH" ]; then
    run_stage compile-check "$T_TRAIN" "bench compile --check-driver, sm_$COMPILE_ARCH, beside the training run" \
      quiet "${FASTCRAM[@]}" bench compile --arch "$COMPILE_ARCH" --micro-batches 256 --check-driver \
      --native-lib "" --plain --csv "$OUT_DIR/compile.csv" &
    COMPILE_PID=$!
    BG_PIDS+=($COMPILE_PID)
  else
    skip_stage compile-check "no compile report for this GPU's architecture (only sm_90a and sm_80 are known)"
  fi
  TRAIN_FLAGS=()
  if "${FASTCRAM[@]}" train --help 2>/dev/null | grep -qE -- '--telemetry([^-]|$)'; then TRAIN_FLAGS+=(--telemetry); fi
  stage train "$T_TRAIN" "crammed-bert, triton kernels, ${TRAIN_MINUTES}-minute budget" \
    "${FASTCRAM[@]}" train --preset crammed-bert --kernels triton --minutes "$TRAIN_MINUTES" \
    --log-interval 10 --checkpoint-interval 100000 --out "$WORK/train-run" ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}
  [ -f "$WORK/train-run/log.jsonl" ] && cp "$WORK/train-run/log.jsonl" "$OUT_DIR/train_log.jsonl"
  [ -f "$WORK/train-run/telemetry.jsonl" ] && cp "$WORK/train-run/telemetry.jsonl" "$OUT_DIR/telemetry.jsonl"
  [ -n "$COMPILE_PID" ] && wait "$COMPILE_PID"
fi

for pid in ${BG_PIDS[@]+"${BG_PIDS[@]}"}; do kill "$pid" 2>/dev/null; done
wait 2>/dev/null
BG_PIDS=()

# ---------------------------------------------------------------- report and summary

REPORT_FLAGS=(--out "$OUT_DIR" --work "$WORK")
[ "$DRY" = 1 ] && REPORT_FLAGS+=(--dry-run)
if ! "$PY" -m fastcram.benchmarks.gpu_report "${REPORT_FLAGS[@]}"; then
  { echo "# fastcram GPU check (the report generator failed; raw stage table)"; echo; echo '```';
    cat "$WORK/stages.tsv"; echo '```'; } > "$OUT_DIR/report.md"
  cat "$WORK/stages.tsv"
fi
say "total $(($(date +%s) - START))s; files in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
# exit 0 only when every stage that ran passed
if awk -F'\t' '$2 != "0" && $2 != "-" { bad = 1 } END { exit bad }' "$WORK/stages.tsv"; then exit 0; fi
exit 1
