"""benchmarks/gpu_check.sh and its probe, checked without a GPU: the script
parses, its step limits fit the 9 minutes a GPU run may take, and the
sanitize cases are valid calls that reach both kinds of main kernel."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
sys.path.insert(0, ROOT)

from acon_cuda.testing import has_cuda_test_hooks  # noqa: E402
from benchmarks.probes import gpu_probe  # noqa: E402

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")


@needs_bash
def test_the_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


@needs_bash
def test_the_step_limits_fit_nine_minutes():
    done = subprocess.run(["bash", SCRIPT, "--plan"], capture_output=True, text=True, check=True)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    limits = {name: int(lines[name]) for name in ["PREFLIGHT", "BUILD", "LOADS", "PARALLEL", "KERNELS", "BENCH"]}
    planned, deadline = (int(v) for v in lines["PLANNED"].split(" DEADLINE "))
    assert planned == sum(limits.values())
    assert planned <= deadline <= 540
    # The build was measured at about 80 s on 16 cores (the script's header).
    assert limits["BUILD"] >= 120
    inside = dict(item.split(" ") for item in lines["PARALLEL:"].split(", "))
    assert int(inside["SANITIZER_TRIAL"]) + int(inside["SANITIZER"]) <= limits["PARALLEL"]
    assert int(inside["TESTS"]) <= limits["PARALLEL"]


def test_the_sanitize_cases_cover_every_variant():
    cases = gpu_probe.SANITIZE_CASES
    assert {c.dtype for c in cases} == {torch.float32, torch.float64, torch.float16, torch.bfloat16}
    assert {c.kind for c in cases} == {"runs", "columns"}
    for kind in ["runs", "columns"]:
        assert any(c.kind == kind and c.unaligned for c in cases)  # element-wise
        assert any(c.kind == kind and c.per_sample for c in cases)  # the reduce's per-sample sums
        assert {m for c in cases if c.kind == kind for m in c.masks} == set(gpu_probe.EVERY_MASK)
    # The 16-bit columns kernel (C a multiple of 8), the widest column tile.
    assert any(c.layout == "channels_last" and c.dtype.itemsize == 2 and c.shape[1] % 8 == 0 for c in cases)
    assert any(c.layout == "channels_last" and c.shape[1] >= 1024 for c in cases)
    # A ragged run (7x7 map) and a run cut into chunks (long lines).
    assert any(c.kind == "runs" and c.shape[2:] == (7, 7) for c in cases)
    assert any(c.kind == "runs" and c.shape[2] * c.shape[3] >= 65536 for c in cases if len(c.shape) == 4)
    assert {c.kind for c in cases if c.turns} == {"runs", "columns"}


@pytest.mark.parametrize("case", gpu_probe.SANITIZE_CASES, ids=lambda c: c.name)
def test_a_sanitize_case_is_a_valid_call(case):
    x, p1, p2, beta, grad = gpu_probe.make_sanitize_case(case, "cpu")
    expected = gpu_probe.physical_shape(case) if case.layout == "features_last" else case.shape
    assert tuple(x.shape) == expected
    if case.layout == "channels_last":
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert (x.storage_offset() == 1) == case.unaligned
    gpu_probe.run_case(case, "cpu")
    if has_cuda_test_hooks():
        gpu_probe.run_case(case, "emulated")  # the CUDA code, on the CPU


@pytest.mark.skipif(not has_cuda_test_hooks(), reason="a CPU-only build: no CUDA launch plan")
@pytest.mark.parametrize("case", gpu_probe.SANITIZE_CASES, ids=lambda c: c.name)
def test_a_sanitize_case_reaches_its_kernel(case):
    for backward in (False, True):
        assert gpu_probe.launch_kinds(case, backward)[0] == case.kind
    if case.turns:
        # Even at the most resident blocks (8 a multiprocessor), a block or
        # team takes two items or more, in the forward at least (the plan:
        # kind, grid, threads, items, teams per block, ...).
        plans = [gpu_probe.launch_kinds(case, backward, (132, 8))[1] for backward in (False, True)]
        assert any(plan[3] > plan[1] * plan[4] for plan in plans)


def test_the_probe_lists_its_cases():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.probes.gpu_probe", "--list"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) >= len(gpu_probe.SANITIZE_CASES)
