"""The CUDA kernels' code without a GPU: the CUDA build registers test hooks
that run the kernels' per-thread code and work split on CPU tensors, block by
block and thread by thread, as on a GPU of a given size. This checks their
indexing (vector and element-wise paths, chunks, tiles, per-sample groups,
grid-stride loops) and arithmetic against the float64 truth. Not covered: the
warp shuffles and barriers of the block reductions, and the GPU itself."""

import pytest
import torch
from cases import check_against_truth, dtype_pairs, leaves, make_params, make_x, per_sample_kinds, shape_layouts

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.acon, "_acon_c_forward_cuda_emulated"),
    reason="this build has no CUDA kernels",
)

# (multiprocessors, resident blocks per multiprocessor): an H200 at the
# kernels' occupancy, and a one-block GPU, on which every block loops over
# many work items.
GPUS = [pytest.param((132, 3), id="h200"), pytest.param((1, 1), id="one_block")]


def run_emulated(gpu):
    def run(x, p1, p2, beta, channel_dim, grad):
        x, p1, p2, beta = leaves(x, p1, p2, beta)
        y = torch.ops.acon._acon_c_forward_cuda_emulated(x, p1, p2, beta, channel_dim, *gpu)
        grads = torch.ops.acon._acon_c_backward_cuda_emulated(grad, x, p1, p2, beta, channel_dim, *gpu)
        return y, grads

    return run


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


@pytest.mark.parametrize(
    "shape, channel_dim",
    [((64, 96, 40, 40), 1), ((96, 40, 40, 32), -1), ((4096, 2, 3), 1)],
    ids=["runs_many_chunks", "columns_many_chunks", "runs_of_3"],
)
def test_many_rows_per_block(shape, channel_dim):
    """Tensors big enough that blocks take several rows per thread, several
    chunks per channel, and (columns) the row cap per chunk."""
    x = 3 * torch.randn(shape)
    p1, p2, beta = make_params(x, channel_dim, False, torch.float32)
    check_against_truth(x, p1, p2, beta, channel_dim, run=run_emulated((132, 3)))


def test_parameter_gradients_do_not_depend_on_the_run():
    x, channel_dim = make_x((8, 64, 28, 28), "channels_last", torch.float32, "cpu")
    p1, p2, beta = make_params(x, channel_dim, True, torch.float32)
    grad = torch.randn_like(x)
    first = run_emulated((132, 3))(x, p1, p2, beta, channel_dim, grad)[1]
    again = run_emulated((132, 3))(x, p1, p2, beta, channel_dim, grad)[1]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_bad_gpu_size():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="must be positive"):
        torch.ops.acon._acon_c_forward_cuda_emulated(x, torch.ones(3), torch.ones(3), torch.ones(3), 1, 0, 1)
