"""What the tests parametrise over: dtypes, devices and per-dtype tolerances."""

import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Every device the package has kernels for; tests skip those absent here.
DEVICES = ["cpu", "cuda"]

# (rtol, atol) for comparing a result of this dtype with the float64 truth
# rounded to it. Reduced types get two units of rounding (the fused op and the
# truth may round a value to neighbouring numbers); float32 allows for
# exp_u20's approximation (relative error below 2e-6).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}


def device_available(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "acon::acon_c_forward", "CUDA"
        )
    return True
