#!/usr/bin/env bash
# On a GPU machine, from the repository root: build the extension against the
# torch installed there (no network needed), run the test suite's CUDA cases
# (launches per call and CUDA graph capture included),
# run compute-sanitizer's memcheck, racecheck and synccheck on shapes with
# more work items than blocks (where the machine has it), time each kernel
# with torch.profiler, then benchmark on the GPU. Each step has its own time
# limit so that the whole script ends within 8 minutes; a failing step does
# not stop the later ones, and the script's exit status says whether all
# passed. Results go to benchmarks/results/gpu/ (and to $OUT if set).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ $rc -eq 0 ] || status=1
    return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

step build 150 $PY -m pip install --no-build-isolation --no-deps -e . || { echo "build failed"; exit 1; }
$PY -c "import torch, acon_cuda; assert torch._C._dispatch_has_kernel_for_dispatch_key('acon::acon_c_forward', 'CUDA'), 'no CUDA kernels were built'" || exit 1
mkdir -p benchmarks/results/gpu
# The CUDA cases (the CPU-only emulation and plan tests run in CI).
step tests 130 $PY -m pytest tests -q -p no:cacheprovider -rs -k cuda \
    --ignore=tests/test_cuda_emulation.py --ignore=tests/test_cuda_launch_plan.py \
    --junitxml=benchmarks/results/gpu/tests.xml
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$SANITIZER" ]; then
    for tool in memcheck racecheck synccheck; do
        step "sanitizer $tool" 25 "$SANITIZER" --tool "$tool" --error-exitcode 3 \
            $PY -m benchmarks.probes.gpu_probe --sanitize
    done
else
    echo "=== no compute-sanitizer here"
fi
step kernels 40 $PY -m benchmarks.probes.gpu_probe --profile benchmarks/results/gpu
step bench 70 $PY -m benchmarks --device cuda --dtype float32,bfloat16 \
    --sizes large,small --no-train --out benchmarks/results/gpu
if [ -n "${OUT:-}" ]; then
    cp -r benchmarks/results/gpu "$OUT"/ 2>/dev/null || true
fi
echo "=== summary (benchmarks/results/gpu/table.txt)"
cat benchmarks/results/gpu/table.txt 2>/dev/null || echo "no benchmark table"
exit $status
