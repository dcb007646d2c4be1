"""What the tests parametrise over: dtypes, devices and per-dtype tolerances;
and the inductor cache that the tests and the benchmark share."""

import os
import tempfile

import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# The seed every test starts from (conftest.py) and that tests seeding
# their own generators offset: ACON_TEST_SEED=N runs the suite on other draws.
TEST_SEED = int(os.environ.get("ACON_TEST_SEED", "0"))

# Every device the package has kernels for; tests skip those absent here.
DEVICES = ["cpu", "cuda"]

# (rtol, atol) of the arithmetic in each opmath dtype, relative to the
# magnitude of the terms that make a result: float32 allows for exp_u20 and
# the reciprocal estimate (a few units in the last place) and for float32
# accumulation of up to a few thousand terms before sums move to float64.
TOLERANCES = {
    torch.float64: (1e-12, 1e-300),
    torch.float32: (1e-5, 1e-30),
}

# (rtol, atol) of rounding a result to a narrower dtype: the fused op and the
# float64 truth may land one unit in the last place apart; atol covers
# float16's subnormals.
ROUNDING = {
    torch.float32: (2**-23, 1e-45),
    torch.float16: (2**-10, 2**-24),
    torch.bfloat16: (2**-7, 1e-38),
}


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the kernels compute in for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def device_available(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "acon::acon_c_forward", "CUDA"
        )
    return True


def has_cuda_test_hooks() -> bool:
    """Whether this build has kernels for the CUDA kernels' test hooks
    (``_acon_c_forward_cuda_emulated``, ``_acon_c_backward_cuda_emulated``,
    ``_acon_c_cuda_launch_plan``), which run on CPU tensors: CUDA builds
    only, though every build has their schemas."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("acon::_acon_c_forward_cuda_emulated", "CPU")


def assert_as_accurate(actual, baseline, truth, slack: float = 4.0) -> None:
    """Checks that the tensors `actual` are as close to the float64 `truth`
    as `baseline` (the same values by another computation order, in the
    same dtype) is, within `slack` times its largest error plus a few units
    of rounding of the largest value.

    Two float32 computations of a network's gradients round differently, and
    an element that cancels to near zero keeps the error of the large terms
    it sums; how large depends on the network (a BatchNorm over few samples
    amplifies it). The baseline's own error against float64 measures that,
    on whatever machine runs the test, where a fixed tolerance would hold
    on some CPUs and not on others."""
    actual, baseline, truth = list(actual), list(baseline), list(truth)
    scale = max((t.abs().max().item() for t in truth if t.numel()), default=0.0)
    eps = torch.finfo(baseline[0].dtype).eps

    def error(tensors):
        return max((float((a.double() - t).abs().max()) for a, t in zip(tensors, truth) if t.numel()), default=0.0)

    budget = slack * error(baseline) + 16 * eps * scale
    assert error(actual) <= budget, (
        f"error {error(actual):.3g} against float64 exceeds {budget:.3g} "
        f"({slack} x the baseline's {error(baseline):.3g}, plus 16 eps x {scale:.3g})"
    )


def use_inductor_cache_per_cpu_capability() -> None:
    """Points torch.compile's on-disk cache at one folder per
    ATEN_CPU_CAPABILITY, unless TORCHINDUCTOR_CACHE_DIR is set: the cache
    does not key its generated C++ by the capability, and code generated
    under one build failed to compile under another (=default after a run of
    the CPU's own build). Call it before anything compiles; subprocesses
    inherit it."""
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR",
        os.path.join(tempfile.gettempdir(), "torchinductor_acon_" + os.environ.get("ATEN_CPU_CAPABILITY", "native")),
    )
