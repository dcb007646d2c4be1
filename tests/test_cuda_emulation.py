"""The CUDA kernels' code without a GPU: the CUDA build registers test hooks
that run the kernels' per-thread code, work split and host flow on CPU
tensors, block by block and thread by thread, as on a GPU of a given size,
with the warp and block sums as loops in the GPU's order. This checks their
indexing (vector, ragged and element-wise paths, chunks, teams, tiles,
per-sample groups, grid-stride loops, the reduce) and arithmetic against the
float64 truth. A third hook returns the launch plan, whose properties (launch
count, balance, busy lanes) are checked on an H200-sized GPU. Not covered:
barriers, races, and the GPU itself."""

import cases
import pytest
import torch
from cases import check_against_truth, dtype_pairs, make_params, make_x, per_sample_kinds, run_emulated, shape_layouts

from acon_cuda.testing import has_cuda_test_hooks

pytestmark = pytest.mark.skipif(
    not has_cuda_test_hooks(),
    reason="this build has no CUDA kernels",
)

# (multiprocessors, resident blocks per multiprocessor): an H200 at the
# kernels' occupancy, and a one-block GPU, on which every block loops over
# many work items.
GPUS = [pytest.param((132, 3), id="h200"), pytest.param((1, 1), id="one_block")]


@pytest.mark.parametrize("gpu", GPUS)
@per_sample_kinds
@pytest.mark.parametrize("shape, layout", list(shape_layouts()))
@pytest.mark.parametrize("dtype, p_dtype", list(dtype_pairs()))
def test_cuda_kernels_match_reference(dtype, p_dtype, shape, layout, per_sample, gpu):
    x, channel_dim = make_x(shape, layout, dtype, "cpu")
    p1, p2, beta = make_params(x, channel_dim, per_sample, p_dtype)
    check_against_truth(x, p1, p2, beta, channel_dim, run=run_emulated(gpu))


@pytest.mark.parametrize("layout", ["contiguous", "features_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_element_wise_path_for_unaligned_data(dtype, layout):
    """Data one element past a 16-byte boundary: the element-wise kernels."""
    shape = (3, 16, 8, 8) if layout == "contiguous" else (3, 8, 8, 16)
    channel_dim = 1 if layout == "contiguous" else -1
    storage = 3.0 * torch.randn(1 + torch.Size(shape).numel(), dtype=dtype)
    x = storage[1:].view(shape)
    p1, p2, beta = make_params(x, channel_dim, True, dtype)
    check_against_truth(x, p1, p2, beta, channel_dim, run=run_emulated((132, 3)))


# Shapes whose work items far outnumber the blocks, or whose lines are cut
# into many chunks: (shape, channel_dim, per-sample beta).
MANY_ITEMS = [
    pytest.param((64, 96, 40, 40), 1, False, id="runs_many_chunks"),
    pytest.param((96, 40, 40, 32), -1, False, id="columns_many_chunks"),
    pytest.param((4096, 2, 3), 1, False, id="runs_of_3"),
    pytest.param((64, 64, 7, 7), 1, True, id="7x7_per_sample"),
    pytest.param((4, 512, 7, 7), 1, False, id="4x512x7x7"),
    pytest.param((256, 4, 16), -1, True, id="features_last_per_sample"),
    pytest.param((512, 3, 8), 1, False, id="512x3x8"),
    pytest.param((96, 2, 100), -1, False, id="features_last_100"),
    pytest.param((1, 8, 256, 256), 1, False, id="long_runs_few_channels"),
]


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, channel_dim, per_sample", MANY_ITEMS)
def test_many_items_per_block(shape, channel_dim, per_sample, dtype, gpu):
    """Blocks and teams that take several items, lines cut into chunks,
    teams narrower than a warp, and (columns) the row cap per chunk."""
    x = (3 * torch.randn(shape)).to(dtype)
    p1, p2, beta = make_params(x, channel_dim, per_sample, torch.float32)
    check_against_truth(x, p1, p2, beta, channel_dim, run=run_emulated(gpu))


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("shape, channel_dim", [((5, 24, 7, 7), 1), ((5, 7, 7, 24), -1), ((3, 8, 70), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_unaligned_views(dtype, shape, channel_dim, offset):
    """Views that start `offset` elements past an aligned address: the
    element-wise kernels, in both directions."""
    storage = 3.0 * torch.randn(offset + torch.Size(shape).numel(), dtype=dtype)
    x = storage[offset:].view(shape)
    p1, p2, beta = make_params(x, channel_dim, True, dtype)
    for gpu in [(132, 3), (1, 1)]:
        check_against_truth(x, p1, p2, beta, channel_dim, run=run_emulated(gpu))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_mask(layout):
    """Without parameter gradients (the path without workspace or reduce),
    grad_x is the same as with them; without grad_x, the parameter gradients
    are; with neither, everything is empty."""
    x, channel_dim = make_x((4, 24, 9, 9), layout, torch.float32, "cpu")
    p1, p2, beta = make_params(x, channel_dim, True, torch.float32)
    grad = torch.randn_like(x)
    hook = torch.ops.acon._acon_c_backward_cuda_emulated
    full = hook(grad, x, p1, p2, beta, channel_dim, 132, 3, [True, True])
    no_params = hook(grad, x, p1, p2, beta, channel_dim, 132, 3, [True, False])
    assert torch.equal(no_params[0], full[0])
    assert [t.numel() for t in no_params[1:]] == [0, 0, 0]
    no_x = hook(grad, x, p1, p2, beta, channel_dim, 132, 3, [False, True])
    assert no_x[0].numel() == 0
    for got, want in zip(no_x[1:], full[1:]):
        assert torch.equal(got, want)
    nothing = hook(grad, x, p1, p2, beta, channel_dim, 132, 3, [False, False])
    assert [t.numel() for t in nothing] == [0, 0, 0, 0]


def test_bad_gpu_size():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="must be positive"):
        torch.ops.acon._acon_c_forward_cuda_emulated(x, torch.ones(3), torch.ones(3), torch.ones(3), 1, 0, 1)


# The ways the backward keeps its sums, each reached by a shape on an
# H200-sized GPU: (shape, channel_dim, per-sample beta, whether the items
# write beta's gradient themselves: a per-sample beta whose items hold whole
# groups).
SUM_PATHS = [
    pytest.param((64, 16, 7, 7), 1, True, True, id="runs_whole_groups_several_an_item"),
    pytest.param((4, 8, 16, 16), 1, True, True, id="runs_one_group_an_item"),
    pytest.param((2, 4, 96, 96), 1, True, False, id="runs_groups_cut_into_chunks"),
    pytest.param((96, 4, 16), -1, True, True, id="columns_whole_groups_group_lanes"),
    pytest.param((16, 7, 7, 64), -1, True, True, id="columns_whole_groups_7x7"),
    pytest.param((3, 60, 60, 8), -1, True, False, id="columns_groups_cut_into_chunks"),
    pytest.param((4, 40, 40, 24), -1, False, False, id="columns_per_channel_chunks"),
]


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, channel_dim, per_sample, beta_direct", SUM_PATHS)
def test_every_way_of_keeping_sums(shape, channel_dim, per_sample, beta_direct, dtype, gpu):
    """The plan reaches the path (with beta's gradient written by the main
    kernel, the reduce has no beta units), and its results match the truth."""
    x = (3 * torch.randn(shape)).to(dtype)
    c = x.shape[channel_dim]
    reduce = cases.launch_plan(x, per_sample, channel_dim, True, 132, 3)[1]
    assert reduce["items"] == (c if beta_direct else c + (x.shape[0] * c if per_sample else c))
    p1, p2, beta = make_params(x, channel_dim, per_sample, torch.float32 if dtype == torch.bfloat16 else dtype)
    check_against_truth(x, p1, p2, beta, channel_dim, run=run_emulated(gpu))


@pytest.fixture
def mutate():
    """Sets the emulation's mutation (a barrier site to drop, a shuffle
    width), and resets it."""
    yield torch.ops.acon._acon_c_cuda_emulation_mutate
    torch.ops.acon._acon_c_cuda_emulation_mutate(0, 0)


# Each barrier site of acon_c_kernel.cuh (BarrierSite) and a call where it
# is needed: a block taking several items (a one-block GPU), so that a
# barrier at the end of an item has a next item behind it; items of several
# pieces (site 4); a reduce whose units have several lanes (sites 5 and 6,
# on an H200-sized GPU).
BARRIERS = [
    pytest.param(1, (4, 9, 9, 24), -1, False, id="columns_sums_staged"),
    pytest.param(2, (4, 9, 9, 24), -1, False, id="columns_sums_read"),
    pytest.param(3, (96, 4, 16), -1, True, id="columns_group_sums_staged"),
    pytest.param(4, (8, 20, 64), -1, True, id="columns_group_sums_read"),
    pytest.param(5, (1, 2, 256, 256), 1, False, id="reduce_lanes_staged"),
    pytest.param(6, (1, 2, 256, 256), 1, False, id="reduce_lanes_added"),
]


@pytest.mark.parametrize("site, shape, channel_dim, per_sample", BARRIERS)
def test_a_dropped_barrier_is_caught(site, shape, channel_dim, per_sample, mutate):
    """The emulation checks shared memory between barriers: with any one
    barrier gone, two threads touch a word in the same phase."""
    x = torch.randn(shape)
    p1, p2, beta = make_params(x, channel_dim, per_sample, torch.float32)
    grad = torch.randn_like(x)
    gpu = (132, 3) if site in (5, 6) else (1, 1)
    hook = torch.ops.acon._acon_c_backward_cuda_emulated
    hook(grad, x, p1, p2, beta, channel_dim, *gpu, [True, True])  # unmutated: no error
    mutate(site, 0)
    with pytest.raises(RuntimeError, match="emulated shared memory: thread .* with no barrier between"):
        hook(grad, x, p1, p2, beta, channel_dim, *gpu, [True, True])


@pytest.mark.parametrize(
    "shape, per_sample, width",
    [
        pytest.param((8, 16, 7, 7), True, 8, id="teams_of_16_per_sample"),
        pytest.param((1, 2, 256, 256), False, 16, id="teams_of_32"),
    ],
)
def test_a_narrower_shuffle_width_is_caught(shape, per_sample, width, mutate):
    """Team sums by shuffles of a width below the team's miss lanes: the
    parameter gradients are wrong. (A wider width changes nothing: a
    shuffle-down tree brings lane 0 only lanes below the team's size.)"""
    x = torch.randn(shape)
    p1, p2, beta = make_params(x, 1, per_sample, torch.float32)
    check_against_truth(x, p1, p2, beta, 1, run=run_emulated((132, 3)))
    mutate(0, width)
    with pytest.raises(AssertionError):
        check_against_truth(x, p1, p2, beta, 1, run=run_emulated((132, 3)))
    mutate(0, 32)
    check_against_truth(x, p1, p2, beta, 1, run=run_emulated((132, 3)))
