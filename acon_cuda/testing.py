"""What the tests parametrise over: dtypes, devices and per-dtype tolerances."""

import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

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
