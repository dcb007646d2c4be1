"""Fused ACON activations for PyTorch.

``acon_c(x, p1, p2, beta, channel_dim=1)`` computes
``(p1 - p2) * x * sigmoid(beta * (p1 - p2) * x) + p2 * x`` with hand-written
CPU (and CUDA) kernels registered as ``torch.ops.acon.*``.
``acon_cuda.reference`` holds the same function in plain PyTorch ops.
``AconA``, ``AconB``, ``AconC`` and ``MetaAconC`` are the nn.Modules;
``convert_activations`` swaps them into a model, ``param_groups`` keeps
their parameters out of weight decay.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.acon.*)
from . import reference
from .convert import convert_activations
from .modules import AconA, AconB, AconC, MetaAconC, param_groups
from .ops import acon_c, cpu_kernel_isa

__all__ = [
    "AconA",
    "AconB",
    "AconC",
    "MetaAconC",
    "acon_c",
    "convert_activations",
    "cpu_kernel_isa",
    "param_groups",
    "reference",
]
__version__ = "0.1.0"
