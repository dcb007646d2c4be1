#!/usr/bin/env bash
# On a GPU machine, from the repository root: build the extension against the
# torch installed there (no network needed); run the test suite's CUDA cases
# and, side by side, compute-sanitizer's memcheck, racecheck, synccheck and
# initcheck on this project's kernels; time each kernel with torch.profiler;
# benchmark on the GPU.
#
# Planned to end within 9 minutes (DEADLINE_S): each step has a time limit,
# the limits add up to at most DEADLINE_S, and no step runs past the
# deadline. A step at its limit gets SIGINT (pytest and the benchmark then
# write what they measured), SIGKILL 5 s later. A failing step does not stop
# the later ones (only the setuptools check, the build and the load check
# do); the exit status says whether all passed. Every step prints its time.
# Everything (logs/, steps.tsv, tests.xml, ptxas.txt, kernels.json,
# sanitize_kernels.txt, results.json, table.txt) is written as it goes to
# $OUT/gpu when OUT is set, else to benchmarks/results/gpu, so a run stopped
# at its limit still returns what it measured.
#
# The build's time, measured per translation unit on the 2-core development
# machine (torch 2.11.0+cu130, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=1, from
# ninja's log; tree of 2026-12-06): acon.cpp 5.8 s, acon_c.cpp 14.7,
# acon_c_autograd.cpp 20.9, meta_acon_c.cpp 22.4, meta_acon_c_generator.cpp
# 12.1, cpu/acon_c_cpu.cpp 13.2, cpu/meta_acon_c_cpu.cpp 18.4,
# cpu/acon_c_kernel_default.cpp 16.0, cuda/acon_c_emulation.cpp 20.6,
# cuda/acon_c_cuda.cu (nvcc, sm_90) 32.2; then cpu/acon_c_kernel_avx2.cpp
# 20.0 and cpu/acon_c_kernel_avx512.cpp 19.1, each in a ninja run of its own
# after the others (setup.py compiles one set of flags at a time); link and
# pip about 7 s: 222 s on one core. The kernels' block-level rewrite (same
# day) made the .cu about 40 s (setup.py's rebuild of it alone: 48 s with
# setup.py's own start and the link). With 16 cores the first set takes
# about its longest file (the .cu), so about 40 + 20 + 19 + 7 = 86 s; the
# limit allows nearly twice that.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

DEADLINE_S=540     # the whole script, fixed overhead included
LIMIT_PREFLIGHT=45 # setuptools, nvidia-smi, the versions (a cold torch import)
LIMIT_BUILD=150    # about 86 s expected (above)
LIMIT_LOADS=25     # the extension loads and has CUDA kernels
LIMIT_PARALLEL=180 # the tests, and beside them compute-sanitizer (below)
LIMIT_KERNELS=40   # gpu_probe --profile: 7 shapes, and the kernels the sanitize cases launch
LIMIT_BENCH=85     # 8 cases and the Meta-ACON modules; results.json after each case
# Within LIMIT_PARALLEL, beside the tests: a trial of compute-sanitizer on a
# tiny program, then its four tools at once, each importing torch under it.
LIMIT_TESTS=$LIMIT_PARALLEL
LIMIT_SANITIZER_TRIAL=25
LIMIT_SANITIZER=$((LIMIT_PARALLEL - LIMIT_SANITIZER_TRIAL))
PLANNED=$((LIMIT_PREFLIGHT + LIMIT_BUILD + LIMIT_LOADS + LIMIT_PARALLEL + LIMIT_KERNELS + LIMIT_BENCH))

# --plan: print the limits and stop (tests/test_gpu_check.py reads it).
if [ "${1:-}" = --plan ]; then
    for name in PREFLIGHT BUILD LOADS PARALLEL KERNELS BENCH; do
        var=LIMIT_$name
        echo "$name ${!var}"
    done
    echo "PARALLEL: TESTS $LIMIT_TESTS, SANITIZER_TRIAL $LIMIT_SANITIZER_TRIAL, SANITIZER $LIMIT_SANITIZER"
    echo "PLANNED $PLANNED DEADLINE $DEADLINE_S"
    [ "$PLANNED" -le "$DEADLINE_S" ]
    exit
fi

RESULTS=${ACON_GPU_RESULTS:-${OUT:+$OUT/gpu}}
RESULTS=${RESULTS:-benchmarks/results/gpu}
LOGS=$RESULTS/logs
mkdir -p "$LOGS"
printf 'step\tlimit_s\texit\tseconds\tverdict\n' > "$RESULTS/steps.tsv"
status=0
T0=$SECONDS

elapsed() { echo $((SECONDS - T0)); }

# limit_for LIMIT [END]: the limit a step gets, its planned one cut to what
# is left before END (default: the deadline less the 5 s a kill may take).
limit_for() {
    local left=$((${2:-$((DEADLINE_S - 5))} - $(elapsed)))
    if [ "$left" -lt "$1" ]; then echo $((left > 1 ? left : 1)); else echo "$1"; fi
}

# finish NAME LIMIT RC SECONDS VERDICT LOG: reports a step, with the log's last TAIL lines.
finish() {
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$RESULTS/steps.tsv"
    # One write, so that steps that end together do not interleave their lines.
    printf '%s\n%s\n' "=== $1: $5 (exit $3) after $4 s; log: $6" "$(tail -n "${TAIL:-15}" "$6" | sed 's/^/    /')"
    [ "$5" = pass ] || [ "$5" = "not supported here" ] || status=1
}

# step NAME LIMIT COMMAND...: runs the command, its output in $LOGS/NAME.log.
step() {
    local name=$1 limit start=$SECONDS rc verdict=pass
    limit=$(limit_for "$2")
    shift 2
    echo "=== $name: start at $(elapsed) s (limit $limit s)"
    timeout -s INT -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || verdict=fail
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict=timeout; fi
    finish "$name" "$limit" "$rc" "$((SECONDS - start))" "$verdict" "$LOGS/$name.log"
    return $rc
}

echo "=== GPU check: step limits $PLANNED s, deadline $DEADLINE_S s; results in $RESULTS"
if [ "$PLANNED" -gt "$DEADLINE_S" ]; then
    echo "the step limits add up to $PLANNED s, more than $DEADLINE_S s"
    exit 2
fi

# --- Preflight: what the machine has. ---
# pyproject.toml's `license = "MIT"` (PEP 639) needs setuptools >= 77;
# older ones fail the build on its metadata.
SETUPTOOLS=$(timeout 10 $PY -c "import setuptools; print(setuptools.__version__)" 2>/dev/null)
echo "=== setuptools ${SETUPTOOLS:-missing} (the build needs >= 77)"
if ! [[ "$SETUPTOOLS" =~ ^[0-9]+ ]] || [ "${BASH_REMATCH[0]}" -lt 77 ]; then
    echo "STOP: setuptools ${SETUPTOOLS:-missing} is older than 77, which pyproject.toml's"
    echo "license = \"MIT\" (PEP 639) needs. Install setuptools >= 77 (torch 2.11 wants < 82) on"
    echo "this machine, e.g. from a wheel with pip install --no-index, and run the check again."
    printf 'setuptools\t-\t2\t0\tfail: setuptools %s, needs >= 77\n' "${SETUPTOOLS:-missing}" >> "$RESULTS/steps.tsv"
    exit 2
fi
timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode --format=csv,noheader \
    | tee "$LOGS/nvidia-smi.txt" || true
COMPUTE_MODE=$(cut -d, -f4 "$LOGS/nvidia-smi.txt" 2>/dev/null | head -n 1 | tr -d ' ')
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
timeout $((LIMIT_PREFLIGHT - 20)) $PY - "$NVCC" > "$LOGS/versions.txt" 2>&1 <<'EOF'
import importlib, platform, subprocess, sys
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible")
for name in ["pip", "ninja", "pytest", "numpy", "hypothesis", "triton"]:
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(name, "missing:", type(e).__name__)
try:
    print(subprocess.run([sys.argv[1], "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
except Exception as e:
    print("nvcc: not found", e)
EOF
sed 's/^/    /' "$LOGS/versions.txt"

# --- Build, and check that the CUDA kernels are in it. ---
# No network here: pip neither looks for a newer pip nor at an index.
# ACON_PTXAS_VERBOSE=1: the build log holds each kernel's registers, spills
# and stack (ptxas.txt).
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
# SKIP_BUILD=1: the tree is already built here (a second run on a warm machine).
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    echo "=== build: skipped (SKIP_BUILD=1)"
    printf 'build\t-\t-\t0\tskipped\n' >> "$RESULTS/steps.tsv"
else
    TAIL=4 ACON_PTXAS_VERBOSE=1 step build "$LIMIT_BUILD" $PY -m pip install -v --no-build-isolation --no-deps -e . \
        || { echo "STOP: the build failed (log: $LOGS/build.log)"; exit 1; }
    grep -E "ptxas info|bytes spill|bytes stack" "$LOGS/build.log" | sed 's/^ *//' > "$RESULTS/ptxas.txt" || true
fi
TAIL=2 step loads "$LIMIT_LOADS" $PY -c "
import torch, acon_cuda
from acon_cuda import _build_info as b
print('acon_cuda', acon_cuda.__version__, '| torch', b.TORCH_VERSION, '| CUDA', b.CUDA_VERSION, '| archs', b.CUDA_ARCHS)
assert torch._C._dispatch_has_kernel_for_dispatch_key('acon::acon_c_forward', 'CUDA'), 'no CUDA kernels were built'
" || { echo "STOP: the extension does not load with its CUDA kernels"; exit 1; }

# --- The tests and compute-sanitizer. ---
# The tests' CUDA cases; the CPU-only emulation, plan and drawn tests run in
# CI (without hypothesis, tests/conftest.py runs and the drawn tests skip).
run_tests() {
    $PY -m pytest tests -q -p no:cacheprovider -rfEs --durations=15 \
        -k cuda --ignore=tests/test_cuda_emulation.py --ignore=tests/test_cuda_launch_plan.py \
        --ignore=tests/test_drawn.py --junitxml="$RESULTS/tests.xml"
}
export -f run_tests
export RESULTS

# compute-sanitizer on this project's kernels: all are in namespace
# acon_cuda, and --kernel-name kns= keeps the kernels whose name contains it;
# torch's kernels run uninstrumented (ACON_SANITIZE_DEVICE=emulated: the
# probe's dry run, to try this script without a GPU). initcheck runs unfiltered, since it
# counts a byte as written only when it saw the write: the probe makes its
# data on the CPU and copies it, so the only kernels it launches are this
# project's. The caching allocator is off for memcheck and initcheck, so that
# a read past a tensor leaves its allocation.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2> /dev/null || true)
SANITIZER_TOOLS=(memcheck racecheck synccheck initcheck)
sanitizer_tool() { # sanitizer_tool TOOL
    local filter=(--kernel-name kns=acon_cuda)
    [ "$1" = initcheck ] && filter=()
    case $1 in memcheck | initcheck) export PYTORCH_NO_CUDA_MEMORY_CACHING=1 ;; esac
    "$SANITIZER" --tool "$1" "${filter[@]}" --error-exitcode 3 --report-api-errors no --print-limit 20 \
        $PY -m benchmarks.probes.gpu_probe --sanitize --device "${ACON_SANITIZE_DEVICE:-cuda}"
}
export -f sanitizer_tool
export SANITIZER PY

# A tool's verdict: "not supported here" when the sanitizer stopped before
# the probe ran a case and reported no error of the kernels.
sanitizer_verdict() { # sanitizer_verdict RC LOG
    if [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then
        echo timeout
    elif [ "$1" -eq 0 ] && grep -q "sanitize cases ran" "$2"; then
        echo pass
    elif [ "$1" -ne 3 ] && ! grep -q "^ran: " "$2" && ! grep -qE "ERROR SUMMARY: [1-9]" "$2" \
        && grep -qiE "not supported|failed to (initiali|attach|launch)|Internal Sanitizer Error|unable to|=+ Error" "$2"; then
        echo "not supported here"
    else
        echo fail
    fi
}

sanitizer_step() { # sanitizer_step TOOL LIMIT: within the stage (STAGE_END)
    local name="sanitizer-$1" limit start=$SECONDS rc
    limit=$(limit_for "$2" "$STAGE_END")
    echo "=== $name: start at $(elapsed) s (limit $limit s)"
    timeout -s INT -k 5 "$limit" bash -c 'sanitizer_tool "$0"' "$1" > "$LOGS/$name.log" 2>&1
    rc=$?
    TAIL=4 finish "$name" "$limit" "$rc" "$((SECONDS - start))" "$(sanitizer_verdict $rc "$LOGS/$name.log")" \
        "$LOGS/$name.log"
}

# A tiny kernel under memcheck tells "not supported here" from a finding
# before any tool imports torch. Returns whether the tools should run.
sanitizer_trial() {
    local dir start=$SECONDS rc verdict=pass
    dir=$(mktemp -d)
    echo "=== sanitizer-trial: start at $(elapsed) s (limit $LIMIT_SANITIZER_TRIAL s)"
    printf '%s\n' '__global__ void k(int* p) { p[threadIdx.x] = 1; }' \
        'int main() { int* p; cudaMalloc(&p, 128); k<<<1, 32>>>(p); return cudaDeviceSynchronize() != cudaSuccess; }' \
        > "$dir/trial.cu"
    timeout 15 "$NVCC" -arch=native -o "$dir/trial" "$dir/trial.cu" > "$LOGS/sanitizer-trial.log" 2>&1
    rc=$?
    if [ -x "$dir/trial" ]; then
        timeout "$((LIMIT_SANITIZER_TRIAL - 15))" "$SANITIZER" --tool memcheck --error-exitcode 3 "$dir/trial" \
            >> "$LOGS/sanitizer-trial.log" 2>&1
        rc=$?
    fi
    if [ ! -x "$dir/trial" ]; then
        verdict="no trial (nvcc failed)" # the tools run, and their logs tell
    elif [ $rc -eq 124 ]; then
        verdict=timeout # inconclusive: the tools run
    elif [ $rc -ne 0 ] && timeout 10 "$dir/trial"; then
        verdict="not supported here"
    elif [ $rc -ne 0 ]; then
        verdict=fail # the GPU does not run a trivial kernel
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' sanitizer-trial "$LIMIT_SANITIZER_TRIAL" "$rc" "$((SECONDS - start))" "$verdict" \
        >> "$RESULTS/steps.tsv"
    echo "=== sanitizer-trial: $verdict (exit $rc) after $((SECONDS - start)) s"
    [ "$verdict" = pass ] || sed 's/^/    /' "$LOGS/sanitizer-trial.log" | head -n 8
    [ "$verdict" != "not supported here" ] && [ "$verdict" != fail ]
}

run_sanitizers() { # run_sanitizers LIMIT_PER_TOOL PARALLEL(1|0)
    if [ -z "$SANITIZER" ]; then
        echo "=== compute-sanitizer: not installed here"
        printf 'sanitizer\t-\t-\t0\tnot supported here\n' >> "$RESULTS/steps.tsv"
        return 0
    fi
    sanitizer_trial || return 0
    local tool pids=()
    for tool in "${SANITIZER_TOOLS[@]}"; do
        if [ "$2" = 1 ]; then
            sanitizer_step "$tool" "$1" &
            pids+=($!)
        else
            sanitizer_step "$tool" "$1"
        fi
    done
    [ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"
}

# Side by side where the GPU takes several processes (compute mode Default);
# else one after the other in the same time, with memcheck alone.
STAGE_END=$(($(elapsed) + LIMIT_PARALLEL))
[ "$STAGE_END" -le $((DEADLINE_S - 5)) ] || STAGE_END=$((DEADLINE_S - 5))
if [ "${COMPUTE_MODE:-Default}" = Default ]; then
    echo "=== tests and compute-sanitizer side by side (${LIMIT_PARALLEL} s)"
    TAIL=12 step tests "$LIMIT_TESTS" bash -c run_tests &
    tests_pid=$!
    run_sanitizers "$LIMIT_SANITIZER" 1 > "$LOGS/sanitizers.out" 2>&1
    wait $tests_pid || status=1
    cat "$LOGS/sanitizers.out"
else
    echo "=== compute mode $COMPUTE_MODE: the tests, then compute-sanitizer's memcheck alone"
    TAIL=12 step tests $((LIMIT_PARALLEL * 5 / 9)) bash -c run_tests
    SANITIZER_TOOLS=(memcheck)
    run_sanitizers "$LIMIT_SANITIZER" 0
fi
# The sanitizer steps may have run in subshells: their verdicts are in steps.tsv.
cut -f1,5 "$RESULTS/steps.tsv" | grep "^sanitizer" | grep -qE "(fail|timeout)$" && status=1

# --- Timings, alone on the GPU. ---
step kernels "$LIMIT_KERNELS" $PY -m benchmarks.probes.gpu_probe --profile "$RESULTS"
TAIL=3 step bench "$LIMIT_BENCH" $PY -m benchmarks --device cuda --dtype float32,bfloat16 \
    --sizes large,small --no-train --out "$RESULTS"

echo "=== summary after $(elapsed) s ($RESULTS/steps.tsv)"
column -t -s $'\t' "$RESULTS/steps.tsv" 2> /dev/null || cat "$RESULTS/steps.tsv"
echo "=== benchmark ($RESULTS/table.txt)"
cat "$RESULTS/table.txt" 2> /dev/null || echo "no benchmark table"
exit $status
