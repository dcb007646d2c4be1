"""The CUDA launch plan's properties, without a GPU: the CUDA build registers
torch.ops.acon._acon_c_cuda_launch_plan, the plan the GPU launches use
(csrc/cuda/acon_c_launch.h), for a tensor's shape, layout, dtype and beta on a
GPU of a given size."""

import math

import cases
import pytest
import torch
from cases import empty_x

from acon_cuda.testing import has_cuda_test_hooks

pytestmark = pytest.mark.skipif(
    not has_cuda_test_hooks(),
    reason="this build has no CUDA kernels",
)

H200_MULTIPROCESSORS = 132


def launch_plan(x, per_sample, channel_dim, backward, blocks_per_multiprocessor):
    return cases.launch_plan(x, per_sample, channel_dim, backward, H200_MULTIPROCESSORS, blocks_per_multiprocessor)


# (logical shape, layout, per-sample beta): the shapes whose plans were reviewed, training-sized
# maps of every stage, and small ones.
CASES = [
    ((32, 256, 56, 56), "contiguous", False),
    ((32, 256, 56, 56), "channels_last", False),
    ((16, 2048, 7, 7), "contiguous", False),
    ((16, 2048, 7, 7), "channels_last", False),
    ((64, 64, 7, 7), "contiguous", True),
    ((4, 512, 7, 7), "contiguous", False),
    ((1, 64, 512, 512), "contiguous", False),
    ((256, 4, 16), "features_last", True),
    ((512, 3, 8), "contiguous", False),
    ((96, 2, 100), "features_last", False),
    ((256, 4096), "contiguous", True),
    ((256, 4096), "contiguous", False),
    ((8, 197, 768), "features_last", False),
    ((32, 197, 768), "features_last", False),
    ((16, 2048, 7, 7), "channels_last", True),
]
CASE_IDS = ["x".join(map(str, s)) + "-" + layout + ("-per_sample" if ps else "") for s, layout, ps in CASES]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# (multiprocessors, resident blocks per multiprocessor): occupancy is per
# kernel on the GPU (the forward kernels, with fewer registers, may get more
# blocks than the backward's 3), on an H100 PCIe (114) or H100 SXM / H200 (132).
GPU_SIZES = [(sms, blocks) for sms in (114, 132) for blocks in range(2, 9)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout, per_sample", CASES, ids=CASE_IDS)
def test_launches_per_call(shape, layout, per_sample, dtype):
    x, cdim = empty_x(shape, layout, dtype)
    for sms, blocks in GPU_SIZES:
        forward = cases.launch_plan(x, per_sample, cdim, False, sms, blocks)
        backward = cases.launch_plan(x, per_sample, cdim, True, sms, blocks)
        assert [k["kind"] for k in forward] == ["runs" if x.dim() > 2 and layout == "contiguous" else "columns"]
        assert [k["kind"] for k in backward] == [forward[0]["kind"], "reduce"]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout, per_sample", CASES, ids=CASE_IDS)
def test_work_is_balanced(shape, layout, per_sample, dtype, backward):
    """At every GPU size: no block takes more than its share of turns (the
    hook counts the kernel's grid-stride assignment), and where there is
    more than one turn, the last leaves at most 10% of a wave's team slots
    idle (with one turn every item runs at once: no tail)."""
    x, cdim = empty_x(shape, layout, dtype)
    for sms, blocks in GPU_SIZES:
        main = cases.launch_plan(x, per_sample, cdim, backward, sms, blocks)[0]
        assert 1 <= main["grid"] <= sms * blocks, (sms, blocks)
        wave = main["grid"] * main["teams_per_block"]  # team slots of one turn
        turns = math.ceil(main["items"] / wave)
        assert main["most_items"] <= main["teams_per_block"] * turns, (sms, blocks)
        if turns > 1:
            assert turns * wave - main["items"] <= 0.1 * wave, (sms, blocks)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout, per_sample", CASES, ids=CASE_IDS)
def test_reduce_has_independent_lanes(shape, layout, per_sample, dtype):
    """At the backward's occupancy (2 or 3 blocks: up to 80 registers a
    thread, 256 threads), no lane adds more than 32 partial sums (the longest
    chain of dependent loads and adds). At 8 blocks per multiprocessor on
    132, (32, 256, 56, 56) channels_last gives 33: more blocks, more
    partials."""
    x, cdim = empty_x(shape, layout, dtype)
    c = x.shape[cdim]
    for sms in (114, 132):
        for blocks in (2, 3):
            reduce = cases.launch_plan(x, per_sample, cdim, True, sms, blocks)[1]
            assert reduce["lanes"] >= min(2 * c, 4096)
            assert reduce["longest_lane"] <= 32, (sms, blocks)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout, per_sample", CASES, ids=CASE_IDS)
def test_workspace_is_small(shape, layout, per_sample, dtype):
    """At every GPU size, the backward's workspace (its float64 partial sums)
    is at most 5% of the bytes it moves (x, grad_y, grad_x): items are long
    enough, and per-sample items of whole groups write beta's gradient
    themselves."""
    x, cdim = empty_x(shape, layout, dtype)
    moved = 3 * x.numel() * x.element_size()
    for sms, blocks in GPU_SIZES:
        reduce = cases.launch_plan(x, per_sample, cdim, True, sms, blocks)[1]
        assert reduce["workspace_bytes"] <= 0.05 * moved, (sms, blocks, reduce["workspace_bytes"] / moved)


@pytest.mark.parametrize(
    "shape, channel_dim, per_sample", [((2, 3), 1, False), ((4, 5, 2), 1, True), ((3, 2, 6), -1, True)]
)
def test_workspace_of_short_lines(shape, channel_dim, per_sample):
    """Lines too short for the bound get one slot each: three sums a channel
    (two with a per-sample beta, whose gradient the items write)."""
    x = torch.empty(shape)
    c = x.shape[channel_dim]
    reduce = cases.launch_plan(x, per_sample, channel_dim, True, 132, 3)[1]
    assert reduce["workspace_bytes"] == (2 if per_sample else 3) * c * 8


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(64, 64, 7, 7), (32, 512, 7, 7), (8, 64, 14, 14)])
def test_short_runs_keep_threads_busy(shape, dtype, backward):
    """Per-sample beta on 7x7 (and 14x14) maps: one run an item, yet at
    least 75% of the lanes hold a window."""
    x, cdim = empty_x(shape, "contiguous", dtype)
    main = launch_plan(x, True, cdim, backward, 3)[0]
    assert main["kind"] == "runs"
    assert main["busy_permille"] >= 750


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_runs_are_cut_into_chunks(dtype):
    """(1, 64, 512, 512): 64 lines, yet a full GPU's worth of items."""
    x, cdim = empty_x((1, 64, 512, 512), "contiguous", dtype)
    main = launch_plan(x, False, cdim, True, 3)[0]
    assert main["items"] >= H200_MULTIPROCESSORS * 3 * main["teams_per_block"]
    assert main["grid"] >= 0.9 * H200_MULTIPROCESSORS * 3


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        torch.ops.acon._acon_c_cuda_launch_plan(torch.empty(0, 3), torch.ones(3), 1, False, 132, 3)
    with pytest.raises(ValueError, match="must be positive"):
        torch.ops.acon._acon_c_cuda_launch_plan(torch.empty(2, 3), torch.ones(3), 1, False, 0, 3)


def test_plan_table_script():
    """benchmarks/probes/cuda_plan.py (the closing notes' table) runs and prints a row per case and dtype,
    and README's plan rows are its rows."""
    import subprocess
    import sys

    root = __file__.rsplit("/tests/", 1)[0]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.probes.cuda_plan"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x" in line.split("|")[1]]
    assert len(rows) == 2 * 11
    # README's CUDA section quotes some of them: each quoted row is one of these.
    with open(root + "/README.md") as f:
        readme = f.read()
    section = readme[readme.index("## CUDA kernels") : readme.index("## Known limits")]
    quoted = [line for line in section.splitlines() if line.startswith("| ") and "x" in line.split("|")[1]]
    assert quoted and all(line in rows for line in quoted), "README's plan rows differ: rerun the probe"
