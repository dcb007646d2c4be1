"""Fused ACON activations for PyTorch.

``acon_c(x, p1, p2, beta, channel_dim=1)`` computes
``(p1 - p2) * x * sigmoid(beta * (p1 - p2) * x) + p2 * x`` with hand-written
CPU (and CUDA) kernels registered as ``torch.ops.acon.*``.
``acon_cuda.reference`` holds the same function in plain PyTorch ops.
``AconA``, ``AconB``, ``AconC`` and ``MetaAconC`` are the nn.Modules;
``convert_activations`` swaps them into a model, ``fuse_batchnorm`` fuses
each BatchNorm with the ACON module after it (``batch_norm_acon_c``), and
``param_groups`` keeps their parameters out of weight decay.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from ._build import check_build

__version__ = check_build()  # a clear error, before loading the extension

from . import _C, reference  # noqa: E402, F401  (_C registers torch.ops.acon.*)
from .batch_norm import batch_norm_acon_c  # noqa: E402
from .convert import convert_activations  # noqa: E402
from .fuse import fuse_batchnorm, fused_pairs, unfuse_batchnorm  # noqa: E402
from .modules import AconA, AconB, AconC, MetaAconC, param_groups  # noqa: E402
from .ops import acon_c, cpu_kernel_isa  # noqa: E402

__all__ = [
    "AconA",
    "AconB",
    "AconC",
    "MetaAconC",
    "acon_c",
    "batch_norm_acon_c",
    "convert_activations",
    "cpu_kernel_isa",
    "fuse_batchnorm",
    "fused_pairs",
    "param_groups",
    "reference",
    "unfuse_batchnorm",
]
