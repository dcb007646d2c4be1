"""ACON activations as nn.Modules (ACON-A, ACON-B, ACON-C, Meta-ACON), each
computed by the fused op, plus optimizer groups (model conversion is in
``convert.py``).

Parameter names and shapes follow the paper's public code ((1, C, 1, 1)), so
its checkpoints load with ``strict=True``.
"""

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from . import reference
from .meta_acon import (
    autocast_enabled,
    has_plain_submodules,
    meta_acon_c,
    meta_acon_c_modules,
    meta_acon_c_plain,
    uses_batch_statistics,
)
from .ops import acon_c as fused_acon_c

__all__ = ["AconA", "AconB", "AconC", "MetaAconC", "param_groups"]

_IMPLS = {"fused": fused_acon_c, "reference": reference.acon_c}
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class _Acon(LazyModuleMixin, nn.Module):
    """Shared part: width (C, or None for lazy), channel axis, the
    implementation, and the per-channel parameters named in ``_PARAMS``."""

    _PARAMS: Tuple[str, ...] = ()
    cls_to_become = None  # stays its own class once initialised

    def __init__(self, width: Optional[int], channel_dim: int, impl: str, device, dtype):
        with warnings.catch_warnings():
            # LazyModuleMixin warns that lazy modules are new, on every
            # construction; the convention is stable enough for a width.
            warnings.filterwarnings("ignore", message="Lazy modules are a new feature")
            super().__init__()
        if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
            raise ValueError(f"{type(self).__name__}: width must be a positive int or None (lazy), got {width!r}")
        if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
            raise TypeError(f"{type(self).__name__}: channel_dim must be an int, got {channel_dim!r}")
        if impl not in _IMPLS:
            raise ValueError(f"{type(self).__name__}: impl must be one of {sorted(_IMPLS)}, got {impl!r}")
        self.channel_dim = channel_dim
        self.impl = impl
        factory = {"device": device, "dtype": dtype}
        for name in self._PARAMS:
            if width is None:
                setattr(self, name, UninitializedParameter(**factory))
            else:
                setattr(self, name, nn.Parameter(torch.empty((1, width, 1, 1), **factory)))
        if width is not None:
            self.reset_parameters()

    @property
    def width(self) -> Optional[int]:
        """C, or None while a lazy module has not seen its first input."""
        first = getattr(self, self._PARAMS[0])
        return None if isinstance(first, UninitializedParameter) else first.shape[1]

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def _channels_of(self, x: Tensor) -> int:
        if x.dim() < 2:
            raise ValueError(
                f"{type(self).__name__}: expected an input of rank >= 2 (batch, channels, ...), "
                f"got shape {tuple(x.shape)}"
            )
        if not -x.dim() <= self.channel_dim < x.dim():
            raise ValueError(
                f"{type(self).__name__}: channel_dim={self.channel_dim} is out of range for an input of rank {x.dim()}"
            )
        return x.shape[self.channel_dim]

    def initialize_parameters(self, x: Tensor) -> None:  # LazyModuleMixin's hook
        if self.has_uninitialized_params():
            # Every check first: an input that raises leaves the module lazy.
            self._check_dtype(x)
            width = self._channels_of(x)
            if width == 0:
                raise ValueError(
                    f"{type(self).__name__}: cannot take the width from an input with 0 channels on axis "
                    f"{self.channel_dim} (shape {tuple(x.shape)}); give a positive width"
                )
            with torch.no_grad():
                for name in self._PARAMS:
                    getattr(self, name).materialize((1, width, 1, 1))
                self.reset_parameters()

    def _check_dtype(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: x must be a Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{type(self).__name__}: x must be a float32, float64, float16 or bfloat16 tensor, got {x.dtype}"
            )

    def _check_input(self, x: Tensor) -> None:
        channels = self._channels_of(x)
        if channels != self.width:
            raise ValueError(
                f"{type(self).__name__}: input has {channels} channels on axis {self.channel_dim} "
                f"(shape {tuple(x.shape)}), but this module's width is {self.width}"
            )

    def _acon_c(self, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor) -> Tensor:
        return _IMPLS[self.impl](x, p1, p2, beta, self.channel_dim)

    def extra_repr(self) -> str:
        width = "None (lazy)" if self.width is None else str(self.width)
        parts = [f"width={width}", f"channel_dim={self.channel_dim}"]
        parts += self._extra_options()
        if self.impl != "fused":
            parts.append(f"impl={self.impl!r}")
        return ", ".join(parts)

    def _extra_options(self):
        return []


class AconA(_Acon):
    """ACON-A: ``x * sigmoid(beta * x)`` (Swish with a learnable per-channel beta).

    Args:
        width: number of channels C, or None to take it from the first input
            (lazy, as ``nn.LazyLinear``).
        channel_dim: the channel axis of the input (-1 for (B, T, C)).
        impl: "fused" (the fused kernels) or "reference" (plain PyTorch ops,
            for checking and benchmarking).

    Parameter ``beta`` of shape (1, C, 1, 1), initialised to ones (so the
    module starts as SiLU). Input: any rank >= 2 with C channels at
    ``channel_dim``; output of the same shape, dtype and memory format.
    """

    _PARAMS = ("beta",)

    def __init__(self, width=None, channel_dim=1, *, impl="fused", device=None, dtype=None):
        super().__init__(width, channel_dim, impl, device, dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.beta)

    def acon_c_parameters(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(p1, p2, beta) of the ACON-C this module computes."""
        ones = self.beta.new_ones(self.width)
        return ones, torch.zeros_like(ones), self.beta

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self._acon_c(x, *self.acon_c_parameters())


class AconB(_Acon):
    """ACON-B: ``(1 - p) * x * sigmoid(beta * (1 - p) * x) + p * x``.

    Parameters ``p`` (zeros: the module starts as SiLU) and ``beta`` (ones),
    each (1, C, 1, 1). Other arguments as :class:`AconA`.
    """

    _PARAMS = ("p", "beta")

    def __init__(self, width=None, channel_dim=1, *, impl="fused", device=None, dtype=None):
        super().__init__(width, channel_dim, impl, device, dtype)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.p)
        nn.init.ones_(self.beta)

    def acon_c_parameters(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(p1, p2, beta) of the ACON-C this module computes."""
        return self.p.new_ones(self.width), self.p, self.beta

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self._acon_c(x, *self.acon_c_parameters())


_INITS = ("paper", "swish")


class AconC(_Acon):
    """ACON-C: ``(p1 - p2) * x * sigmoid(beta * (p1 - p2) * x) + p2 * x``.

    Parameters ``p1``, ``p2`` and ``beta``, each (1, C, 1, 1), as in the
    paper's public code. ``init="paper"`` initialises them as that code does
    (p1, p2 standard normal, beta ones); ``init="swish"`` sets p1 = 1, p2 = 0,
    beta = 1, so the module equals SiLU exactly at the start: swapped into a
    pretrained SiLU/Swish network it leaves the outputs unchanged. Other
    arguments as :class:`AconA`.
    """

    _PARAMS = ("p1", "p2", "beta")

    def __init__(self, width=None, channel_dim=1, init="paper", *, impl="fused", device=None, dtype=None):
        if init not in _INITS:
            raise ValueError(f"AconC: init must be one of {_INITS}, got {init!r}")
        self.init = init
        super().__init__(width, channel_dim, impl, device, dtype)

    def reset_parameters(self) -> None:
        if self.init == "paper":
            nn.init.normal_(self.p1)
            nn.init.normal_(self.p2)
        else:
            nn.init.ones_(self.p1)
            nn.init.zeros_(self.p2)
        nn.init.ones_(self.beta)

    def acon_c_parameters(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(p1, p2, beta) of the ACON-C this module computes."""
        return self.p1, self.p2, self.beta

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self._acon_c(x, *self.acon_c_parameters())

    def _extra_options(self):
        return [f"init={self.init!r}"]


class MetaAconC(_Acon):
    """Meta-ACON: ACON-C with beta generated from the input, per sample and channel.

    ``beta = sigmoid(bn2(fc2(bn1(fc1(mean(x)))))``, where the mean runs over
    every axis but batch and channel, ``fc1`` / ``fc2`` are 1x1 convolutions
    with bias (C -> max(r, C // r) -> C) and ``bn1`` / ``bn2`` BatchNorm2d, as
    in the paper's public code. ``norm=False`` drops the BatchNorms (the
    layout of YOLOv5's MetaAconC). Parameters ``p1``, ``p2`` (1, C, 1, 1),
    standard normal. Other arguments as :class:`AconA`.

    With ``norm=True``, a batch of 1 normalised with batch statistics (a
    BatchNorm in training mode, or without running statistics) raises a
    ValueError: BatchNorm over one value per channel is undefined.

    The generator runs on (N, C) matrices (``acon_cuda/meta_acon.py``): the
    convolutions as matrix products on views of their weights, the BatchNorms
    with their own parameters, buffers and rules; plain eager calls make one
    autograd node. The submodules' ``forward`` is not called, unless one of
    them is not a plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` or has hooks
    (SyncBatchNorm, pruning, ...): then all are called as in the paper's code.
    """

    _PARAMS = ("p1", "p2")

    def __init__(self, width=None, r=16, channel_dim=1, norm=True, *, impl="fused", device=None, dtype=None):
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"MetaAconC: r must be a positive int, got {r!r}")
        self.r = r
        self.norm = bool(norm)
        super().__init__(width, channel_dim, impl, device, dtype)
        if width is not None:
            self._build_generator(width, device, dtype)

    def _build_generator(self, width, device, dtype):
        hidden = max(self.r, width // self.r)
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Conv2d(width, hidden, kernel_size=1, bias=True, **factory)
        if self.norm:
            self.bn1 = nn.BatchNorm2d(hidden, **factory)
        self.fc2 = nn.Conv2d(hidden, width, kernel_size=1, bias=True, **factory)
        if self.norm:
            self.bn2 = nn.BatchNorm2d(width, **factory)
        # A lazy module builds these on its first input, after model.eval()
        # may have run: they take this module's mode, as if they had been
        # there when the mode was set.
        for child in self.children():
            child.train(self.training)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.p1)
        nn.init.normal_(self.p2)

    def initialize_parameters(self, x: Tensor) -> None:
        if self.has_uninitialized_params():
            self._check_call(x, lazy=True, plain=True)  # an input that raises leaves the module lazy
            super().initialize_parameters(x)
            self._build_generator(self.width, self.p1.device, self.p1.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A lazy module builds its generator from the checkpoint's width, so
        # that the generator's own entries load too.
        p1 = state_dict.get(prefix + "p1")
        if self.has_uninitialized_params() and p1 is not None and p1.dim() == 4:
            width = p1.shape[1]
            with torch.no_grad():
                for name in self._PARAMS:
                    getattr(self, name).materialize((1, width, 1, 1))
            self._build_generator(width, self.p1.device, self.p1.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        plain = has_plain_submodules(self)
        self._check_call(x, lazy=False, plain=plain)  # LazyModuleMixin initialised the module first
        cdim = self.channel_dim % x.dim()
        impl = _IMPLS[self.impl]
        if not plain:
            return meta_acon_c_modules(self, x, cdim, impl)
        if self.impl == "fused":
            return meta_acon_c(self, x, cdim)
        return meta_acon_c_plain(self, x, cdim, impl)

    def _check_call(self, x: Tensor, lazy: bool, plain: bool) -> None:
        """Every check of a call on x, before the generator's BatchNorms count
        or move anything; for a lazy module, before it materialises (its
        generator will be built in this module's mode and p1's dtype).
        `plain`: has_plain_submodules(self)."""
        self._check_dtype(x)
        if lazy:
            self._channels_of(x)
        else:
            self._check_input(x)
        if self.channel_dim % x.dim() == 0:
            raise ValueError("MetaAconC: channel_dim must not be the batch axis 0 (beta is per sample and channel)")
        # The generator's products need x in their dtype, unless autocast
        # casts them (the activation itself takes float32 p1, p2 with 16-bit
        # x). Submodules that are not plain convolutions check their own.
        if plain:
            dtype = self.p1.dtype if lazy else self.fc1.weight.dtype
            if x.dtype != dtype and not autocast_enabled(x):
                raise TypeError(
                    f"MetaAconC: x is {x.dtype} but the generator's parameters are {dtype}; convert the module "
                    f"(module.to({x.dtype})) or run under torch.autocast"
                )
        if self.norm and x.shape[0] == 1:
            # A lazy module's BatchNorms will be new, in this module's mode.
            batch_statistics = (
                self.training if lazy else uses_batch_statistics(self.bn1) or uses_batch_statistics(self.bn2)
            )
            if batch_statistics:
                raise ValueError(
                    "MetaAconC(norm=True) cannot normalise a batch of 1 with batch statistics (its BatchNorm2d "
                    "layers in training mode, or without running statistics): they would normalise one value "
                    "per channel and sample. Use norm=False (no BatchNorm, as YOLOv5 does), a batch of 2 or "
                    "more, or eval mode."
                )

    def _extra_options(self):
        return [f"r={self.r}", f"norm={self.norm}"]


def _acon_parameters(model: nn.Module):
    for module in model.modules():
        if isinstance(module, _Acon):
            for name in module._PARAMS:
                yield getattr(module, name)


def param_groups(model: nn.Module, weight_decay: float):
    """Optimizer parameter groups: ACON parameters (p1, p2, beta, p) without
    weight decay, as the paper's training code keeps them, and every other
    parameter with ``weight_decay``. Meta-ACON's generator convolutions and
    BatchNorms count as other parameters.

    ``torch.optim.SGD(param_groups(model, 1e-4), lr=0.1, momentum=0.9)``.
    Lazy modules must have seen an input first.
    """
    acon = list(_acon_parameters(model))
    if any(isinstance(p, UninitializedParameter) for p in model.parameters()):
        raise ValueError("param_groups: the model has uninitialised (lazy) parameters; run one forward pass first")
    acon_ids = {id(p) for p in acon}
    others = [p for p in model.parameters() if id(p) not in acon_ids]
    return [
        {"params": others, "weight_decay": weight_decay},
        {"params": acon, "weight_decay": 0.0},
    ]
