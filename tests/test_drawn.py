"""Property-based cases (hypothesis) where hand-picked ones stop: drawn
shapes, ranks, channel axes, strides, storage offsets, dtypes and beta
kinds, for the fused op and the CUDA kernels' emulation against the float64
truth, and drawn shapes and GPU sizes for the launch plan's invariants.

Each test has a fixed example budget; CI (CI=true) draws the same examples
every run (tests/conftest.py's hypothesis profiles)."""

import math

import pytest
import torch
import torch.nn.functional as F
from cases import check_against_truth, empty_x, launch_plan, run_emulated

pytest.importorskip("hypothesis", reason="the drawn tests need hypothesis (the test extra)")
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from acon_cuda.testing import DTYPES, has_cuda_test_hooks

needs_cuda_hooks = pytest.mark.skipif(not has_cuda_test_hooks(), reason="this build has no CUDA kernels")


@st.composite
def acon_inputs(draw, max_numel=6000):
    """(x, p1, p2, beta, channel_dim): x of rank 2-5 in a drawn memory order,
    possibly a strided slice at a storage offset; parameters of x's dtype or
    float32, with size-1 axes added; beta per channel or per sample."""
    rank = draw(st.integers(2, 5))
    per_sample = draw(st.booleans())
    cdim = draw(st.integers(1 if per_sample else 0, rank - 1))
    shape = [draw(st.integers(1, 7)) for _ in range(rank)]
    shape[cdim] = draw(st.integers(1, 70))
    if draw(st.integers(0, 9)) == 0:  # now and then an empty axis
        shape[draw(st.integers(0, rank - 1))] = 0
    while math.prod(shape) > max_numel:
        axis = max(range(rank), key=lambda i: shape[i])
        shape[axis] //= 2
    order = draw(st.permutations(range(rank)))  # memory order, outermost first
    step_axis, step = draw(st.integers(0, rank - 1)), draw(st.sampled_from([1, 1, 2]))
    offset = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from(DTYPES))
    p_dtype = draw(st.sampled_from(sorted({dtype, torch.float32}, key=str)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    stored = list(shape)
    stored[step_axis] *= step
    dense = [stored[i] for i in order]
    storage = (3.0 * torch.randn(offset + math.prod(dense), generator=gen)).to(dtype)
    x = storage[offset:].view(dense).permute([order.index(i) for i in range(rank)])
    x = x.narrow(step_axis, 0, stored[step_axis])[(slice(None),) * step_axis + (slice(None, None, step),)]
    assert list(x.shape) == shape

    c, n = shape[cdim], shape[0]
    channel_dim = draw(st.sampled_from([cdim, cdim - rank]))

    def param(values, lead):
        ones = draw(st.integers(0, 2))  # size-1 axes added
        return values.reshape(*([1] * lead), *values.shape, *([1] * ones)).to(p_dtype)

    p1 = param(torch.randn(c, generator=gen), draw(st.integers(0, 1)))
    p2 = param(torch.randn(c, generator=gen), draw(st.integers(0, 1)))
    beta_values = torch.randn((n, c) if per_sample else (c,), generator=gen) + 0.5
    beta = param(beta_values, 0 if per_sample else draw(st.integers(0, 1)))
    return x, p1, p2, beta, channel_dim


@settings(max_examples=100)
@given(acon_inputs())
def test_drawn_inputs_match_reference(inputs):
    x, p1, p2, beta, channel_dim = inputs
    torch.manual_seed(0)  # check_against_truth's grad: the same when an example is replayed
    check_against_truth(x, p1, p2, beta, channel_dim)


GPU_SIZES = st.tuples(st.sampled_from([1, 2, 7, 114, 132]), st.integers(1, 8))


@needs_cuda_hooks
@settings(max_examples=60)
@given(acon_inputs(max_numel=3000), GPU_SIZES)
def test_drawn_inputs_match_reference_in_the_cuda_emulation(inputs, gpu):
    x, p1, p2, beta, channel_dim = inputs
    assume(x.numel() > 0)  # the CUDA host code returns before the kernels
    torch.manual_seed(0)  # check_against_truth's grad: the same when an example is replayed
    check_against_truth(x, p1, p2, beta, channel_dim, run=run_emulated(gpu))


@needs_cuda_hooks
@settings(max_examples=300)
@given(
    shape=st.lists(st.integers(1, 300), min_size=2, max_size=5).filter(lambda s: math.prod(s) <= 2**26),
    layout=st.sampled_from(["contiguous", "channels_last", "features_last"]),
    dtype=st.sampled_from(DTYPES),
    per_sample=st.booleans(),
    backward=st.booleans(),
    multiprocessors=st.sampled_from([114, 132]),
    blocks=st.integers(2, 8),
)
def test_drawn_launch_plans_hold_their_invariants(shape, layout, dtype, per_sample, backward, multiprocessors, blocks):
    """For any shape: one main kernel (plus the reduce in a backward), its
    grid within the resident blocks, and no block past its share of turns."""
    if layout == "channels_last" and len(shape) != 4:
        layout = "contiguous"
    x, cdim = empty_x(shape, layout, dtype)
    kernels = launch_plan(x, per_sample, cdim, backward, multiprocessors, blocks)
    main = kernels[0]
    assert main["kind"] in ("runs", "columns")
    assert [k["kind"] for k in kernels[1:]] == (["reduce"] if backward else [])
    # The main kernel loops over its items (grid-stride) in the blocks that
    # fit at once; the reduce launches a block per group of lanes.
    assert 1 <= main["grid"] <= multiprocessors * blocks
    for k in kernels:
        assert k["grid"] >= 1
        assert k["threads"] % 32 == 0 and 32 <= k["threads"] <= 1024
    turns = math.ceil(main["items"] / (main["grid"] * main["teams_per_block"]))
    assert 1 <= main["most_items"] <= main["teams_per_block"] * turns
    if main["kind"] == "runs":
        assert 0 < main["busy_permille"] <= 1000


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fused_batch_norm_matches_the_two_ops(data):
    """batch_norm_acon_c against F.batch_norm then acon_c, in float64: drawn
    rank, sizes (one value per channel excluded where batch statistics are
    used), memory order, BatchNorm mode and momentum; output, every gradient
    and the running statistics."""
    from acon_cuda.batch_norm import batch_norm_acon_c, batch_norm_acon_c_plain

    rank = data.draw(st.integers(2, 5))
    shape = [data.draw(st.integers(1, 6)) for _ in range(rank)]
    shape[1] = data.draw(st.integers(1, 40))
    training, affine, track = (data.draw(st.booleans()) for _ in range(3))
    track = track or not training  # running statistics are needed without batch statistics
    assume(not training or math.prod(shape) // shape[1] > 1)
    momentum = data.draw(st.sampled_from([0.1, 0.5, 1.0]))
    order = data.draw(st.permutations(range(rank)))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    c = shape[1]
    dense = torch.randn([shape[i] for i in order], generator=gen, dtype=torch.float64) * 2 + 1
    x = dense.permute([order.index(i) for i in range(rank)])

    def draw_tensor(*size, low=0.0):
        return (
            torch.rand(*size, generator=gen, dtype=torch.float64) + low
            if low
            else torch.randn(*size, generator=gen, dtype=torch.float64)
        )

    weight, bias = (draw_tensor(c), draw_tensor(c)) if affine else (None, None)
    running = (draw_tensor(c), draw_tensor(c, low=0.5)) if track else (None, None)
    acon = (draw_tensor(c), draw_tensor(1, c), draw_tensor(c, low=0.5))
    grad = draw_tensor(*shape)

    def run(fn):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias, *acon)]
        stats = [t.clone() if t is not None else None for t in running]
        y = fn(leaves[0], *stats, leaves[1], leaves[2], training, momentum, 1e-5, *leaves[3:])
        y.backward(grad)
        return [y.detach()] + [t.grad for t in leaves if t is not None] + [t for t in stats if t is not None]

    for got, want in zip(run(batch_norm_acon_c), run(batch_norm_acon_c_plain)):
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * scale)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fused_batch_norm_meta_acon_c_matches_the_two(data):
    """BatchNorm then MetaAconC in one op (batch_norm_meta_acon_c) against
    F.batch_norm then the module, in float64: drawn rank, sizes, memory
    order (the batch axis anywhere), modes of both and the generator's
    norm; output, every gradient and every buffer."""
    import copy

    from acon_cuda import MetaAconC
    from acon_cuda.meta_acon import batch_norm_meta_acon_c

    rank = data.draw(st.integers(2, 5))
    shape = [data.draw(st.integers(1, 5)) for _ in range(rank)]
    shape[0] = data.draw(st.integers(2, 6))  # the generator's BatchNorms normalise over the batch
    shape[1] = data.draw(st.integers(1, 40))
    training, affine, track, norm = (data.draw(st.booleans()) for _ in range(4))
    track = track or not training
    order = data.draw(st.permutations(range(rank)))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    c = shape[1]
    dense = torch.randn([shape[i] for i in order], generator=gen, dtype=torch.float64) * 2 + 1
    x = dense.permute([order.index(i) for i in range(rank)])
    weight, bias = (torch.randn(c, generator=gen, dtype=torch.float64) for _ in range(2))
    weight, bias = (weight, bias) if affine else (None, None)
    running = (
        torch.randn(c, generator=gen, dtype=torch.float64),
        torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
    )
    running = running if track else (None, None)
    module = MetaAconC(c, r=2, norm=norm).double().train(training)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)

    def run(fused):
        m = copy.deepcopy(module)
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
        stats = [t.clone() if t is not None else None for t in running]
        args = (leaves[0], *stats, leaves[1], leaves[2], training, 0.1, 1e-5)
        y = batch_norm_meta_acon_c(m, *args) if fused else m(F.batch_norm(*args))
        y.backward(grad)
        grads = [t.grad for t in leaves if t is not None] + [p.grad for p in m.parameters()]
        return [y.detach(), *grads, *[t for t in stats if t is not None], *m.buffers()]

    for got, want in zip(run(True), run(False)):
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * scale)
