"""The channel axis of an activation's input, read from traced graphs.

An ACON module has one parameter per channel, so ``convert_activations`` must
know which axis of each site's input holds the channels: 1 for ``(N, C, ...)``
data (after a convolution, BatchNorm, pooling), -1 for features-last data
(after ``nn.Linear``, a last-axis ``LayerNorm``, a permute that moves
channels last). ``ChannelAxes`` answers that for any node of the one-level
``torch.fx`` graphs of a model's blocks, following the node back through the
operations that keep the axis where it is (elementwise ops, casts, dropout,
other activations) and across block boundaries (into a submodule's graph for
its output, into the callers' graphs for a block's input).
"""

import operator
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .modules import _Acon

__all__ = ["ELEMENTWISE_ACTIVATIONS", "ChannelAxes"]

# Each activation module type and the functional spellings of it (functions,
# or Tensor method names). They are elementwise, so they keep the channel
# axis; ``convert_activations`` also counts a call of one as a site of that
# module type.
ELEMENTWISE_ACTIVATIONS: Dict[Type[nn.Module], Tuple[Any, ...]] = {
    nn.ReLU: (F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_"),
    nn.SiLU: (F.silu,),
    nn.GELU: (F.gelu,),
    nn.ReLU6: (F.relu6,),
    nn.Hardswish: (F.hardswish,),
    nn.Mish: (F.mish,),
    nn.LeakyReLU: (F.leaky_relu, F.leaky_relu_),
    nn.ELU: (F.elu, F.elu_),
    nn.SELU: (F.selu, torch.selu),
    nn.CELU: (F.celu,),
    nn.Softplus: (F.softplus,),
    nn.Sigmoid: (torch.sigmoid, F.sigmoid, "sigmoid"),
    nn.Tanh: (torch.tanh, F.tanh, "tanh"),
    nn.Hardsigmoid: (F.hardsigmoid,),
}

# Producers that decide the axis: their output is (N, C, ...) ...
_CHANNELS_FIRST_MODULES = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_CHANNELS_FIRST_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.batch_norm, F.instance_norm, F.group_norm,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
# ... or features-last.
_FEATURES_LAST_MODULES = (nn.Linear, nn.Bilinear, nn.Embedding)
_FEATURES_LAST_FUNCTIONS = {F.linear, F.layer_norm, F.embedding}

# Ops whose output keeps the axes of their tensor inputs (elementwise, casts).
_AXIS_KEEPING_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.clamp,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.hardtanh,
}  # fmt: skip
_AXIS_KEEPING_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "clamp", "clamp_", "contiguous",
    "clone", "float", "half", "bfloat16", "double", "to", "type_as",
}  # fmt: skip
for _spellings in ELEMENTWISE_ACTIVATIONS.values():
    _AXIS_KEEPING_FUNCTIONS.update(f for f in _spellings if not isinstance(f, str))
    _AXIS_KEEPING_METHODS.update(f for f in _spellings if isinstance(f, str))
_AXIS_KEEPING_MODULES = (
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    _Acon,
    nn.PReLU,
    *ELEMENTWISE_ACTIVATIONS,
)

Callers = Mapping[int, List[Tuple[nn.Module, fx.Node]]]


class ChannelAxes:
    """The channel axis of the values in a model's traced block graphs.

    ``graphs`` maps ``id(block)`` to the block's one-level graph (blocks that
    could not be traced have none: what they output is undecided);
    ``callers`` maps ``id(module)`` to the (block, call node) pairs that call
    it, so that a block's input is followed to what its callers pass.
    """

    def __init__(self, graphs: Mapping[int, fx.Graph], callers: Callers):
        self.graphs = graphs
        self.callers = callers

    def of(self, block: nn.Module, node: Any) -> Optional[int]:
        """1 or -1, the channel axis of the value `node` (of `block`'s graph)
        holds; None where the graphs do not tell."""
        return self._axis(block, node, set())

    def _axis(self, block: nn.Module, node: Any, seen: set) -> Optional[int]:
        if not isinstance(node, fx.Node):
            return None
        key = (id(block), node)
        if key in seen:  # a cycle through block inputs: no answer from here
            return None
        seen.add(key)
        if node.op == "placeholder":
            return self._axis_of_block_input(block, node, seen)
        if node.op == "call_module":
            return self._axis_of_module_output(block, block.get_submodule(node.target), node, seen)
        if node.op == "call_function":
            return self._axis_of_function_output(block, node, seen)
        if node.op == "call_method":
            return self._axis_of_method_output(block, node, seen)
        return None

    def _axis_of_function_output(self, block, node, seen) -> Optional[int]:
        target = node.target
        if target in _CHANNELS_FIRST_FUNCTIONS:
            return 1
        if target in _FEATURES_LAST_FUNCTIONS:
            return -1
        if target in (torch.cat, torch.concat):  # along any axis: the channel axis stays where it is
            return self._same_axis(block, list(node.args[0]), seen)
        if target is torch.permute:
            return _permuted(self._axis(block, node.args[0], seen), node.args[1:])
        if target is torch.flatten:
            return self._axis_after_flatten(block, node, seen)
        if target is operator.getitem:
            return self._axis_of_getitem(block, node, seen)
        if target in _AXIS_KEEPING_FUNCTIONS:
            return self._same_axis(block, _tensor_args(node), seen)
        return None

    def _axis_of_method_output(self, block, node, seen) -> Optional[int]:
        if node.target == "permute":
            return _permuted(self._axis(block, node.args[0], seen), node.args[1:])
        if node.target == "flatten":
            return self._axis_after_flatten(block, node, seen)
        if node.target in _AXIS_KEEPING_METHODS:
            return self._same_axis(block, _tensor_args(node), seen)
        return None

    def _same_axis(self, block, nodes, seen) -> Optional[int]:
        """The axis the decided inputs agree on (an undecided one, like the
        block's input in ``out + identity``, does not object)."""
        axes = {self._axis(block, n, seen) for n in nodes if isinstance(n, fx.Node)}
        axes.discard(None)
        return axes.pop() if len(axes) == 1 else None

    def _axis_after_flatten(self, block, node, seen) -> Optional[int]:
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        axis = self._axis(block, node.args[0], seen)
        return 1 if axis == 1 and isinstance(start, int) and start >= 2 else None

    def _axis_of_getitem(self, block, node, seen) -> Optional[int]:
        source, index = node.args
        if isinstance(source, fx.Node) and source.op == "call_method" and source.target in ("chunk", "split"):
            return self._axis(block, source.args[0], seen)  # pieces keep their axes
        if isinstance(source, fx.Node) and source.target in (torch.chunk, torch.split):
            return self._axis(block, source.args[0], seen)
        index = index if isinstance(index, tuple) else (index,)
        if all(isinstance(i, slice) or i is Ellipsis for i in index):
            return self._axis(block, source, seen)
        return None

    def _axis_of_module_output(self, block, module, node, seen) -> Optional[int]:
        if isinstance(module, _CHANNELS_FIRST_MODULES):
            return 1
        if isinstance(module, _FEATURES_LAST_MODULES):
            return -1
        if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
            shape = getattr(module, "normalized_shape", None)
            return -1 if shape is not None and len(shape) == 1 else None
        if isinstance(module, _AXIS_KEEPING_MODULES):
            return self._axis(block, node.args[0] if node.args else None, seen)
        if type(module).__name__ == "Permute" and hasattr(module, "dims"):  # torchvision.ops.Permute
            return _permuted(self._axis(block, node.args[0], seen), (list(module.dims),))
        if isinstance(module, nn.Flatten):
            axis = self._axis(block, node.args[0], seen)
            return 1 if axis == 1 and module.start_dim >= 2 else None
        graph = self.graphs.get(id(module))
        if graph is None:
            return None
        output = next(n for n in graph.nodes if n.op == "output")
        return self._axis(module, output.args[0], seen)

    def _axis_of_block_input(self, block, placeholder, seen) -> Optional[int]:
        """What every caller of the block passes there, if they agree."""
        position = [n for n in placeholder.graph.nodes if n.op == "placeholder"].index(placeholder)
        axes = set()
        for caller, call in self.callers.get(id(block), []):
            arg = call.args[position] if position < len(call.args) else call.kwargs.get(placeholder.target)
            axes.add(self._axis(caller, arg, seen))
        return axes.pop() if len(axes) == 1 else None


def _tensor_args(node: fx.Node) -> List[fx.Node]:
    return [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]


def _permuted(axis: Optional[int], dims_args: Sequence) -> Optional[int]:
    """Where a permute moves the channel axis `axis`: 1, -1 or None (elsewhere)."""
    dims = dims_args[0] if len(dims_args) == 1 and isinstance(dims_args[0], (list, tuple)) else dims_args
    if axis is None or not all(isinstance(d, int) for d in dims):
        return None
    rank = len(dims)
    dims = [d % rank for d in dims]
    position = dims.index(1 if axis == 1 else rank - 1)
    if position == rank - 1:
        return -1
    return 1 if position == 1 else None
