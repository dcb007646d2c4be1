"""``convert_activations``: swap the activations of an existing model for ACON,
one module per call site, each on the channel axis its input has.

How it works: every block (a module with children, or a user-defined module)
is traced by ``torch.fx`` one level deep, its submodules left as calls. The
traced graphs tell where each activation is applied (a module object called
at three places is three sites; ``F.relu(x)`` in a ``forward`` is a site) and
which operation produced each site's input, which decides the channel axis.
A site whose path (parent, attribute) is used once is swapped in place; a
block with extra sites (a shared module, a functional call) is rewritten as an
``fx.GraphModule`` that calls a module of its own for each of them.
"""

import inspect
import operator
import warnings
from collections import Counter, defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .modules import AconA, AconB, AconC, MetaAconC, _Acon

__all__ = ["convert_activations"]

_NEW = {"acon_a": AconA, "acon_b": AconB, "acon_c": AconC, "meta_acon_c": MetaAconC}

# The functional spellings of each activation module: a call of one of these
# inside a traced forward is a site of that module type.
_FUNCTIONAL: Dict[Type[nn.Module], Tuple[Any, ...]] = {
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
_INPLACE_FUNCTIONS = (F.relu_, torch.relu_, "relu_", F.leaky_relu_, F.elu_)

# What the producer of a site's input says about the channel axis.
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
_FEATURES_LAST_MODULES = (nn.Linear, nn.Bilinear, nn.Embedding)
_CHANNELS_FIRST_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.batch_norm, F.instance_norm, F.group_norm,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
_FEATURES_LAST_FUNCTIONS = {F.linear, F.layer_norm, F.embedding}
# Ops whose output keeps the axes of their tensor inputs (elementwise, casts).
_AXIS_KEEPING_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.clamp, torch.sigmoid, torch.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.hardtanh, F.sigmoid, F.tanh,
}  # fmt: skip
_AXIS_KEEPING_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "clamp", "clamp_", "contiguous",
    "clone", "float", "half", "bfloat16", "double", "to", "type_as", "sigmoid", "tanh",
}  # fmt: skip
_AXIS_KEEPING_MODULES = (
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    _Acon,
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.PReLU,
)  # fmt: skip
for _t in _FUNCTIONAL.values():
    _AXIS_KEEPING_FUNCTIONS.update(f for f in _t if not isinstance(f, str))
    _AXIS_KEEPING_METHODS.update(f for f in _t if isinstance(f, str))


class _OneLevelTracer(fx.Tracer):
    """Traces one block's own forward; every submodule it calls stays a call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _is_torch_nn_builtin(module: nn.Module) -> bool:
    """A torch.nn module other than nn.Sequential: not traced (some, like
    MultiheadAttention, cannot be), and its own forward calls no activation
    function of interest."""
    return type(module).__module__.startswith("torch.nn.") and not isinstance(module, nn.Sequential)


class _Site:
    """One place where an activation is applied: a node of a block's graph."""

    def __init__(self, block_path: str, block: nn.Module, graph: fx.Graph, node: fx.Node, kind: str):
        self.block_path = block_path
        self.block = block
        self.graph = graph
        self.node = node
        self.kind = kind  # "module" or "function"
        self.input = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        if kind == "module":
            self.inplace = bool(getattr(block.get_submodule(node.target), "inplace", False))
        else:
            self.inplace = node.target in _INPLACE_FUNCTIONS or bool(node.kwargs.get("inplace", False))
        self.channel_dim: Optional[int] = None
        self.new_name: Optional[str] = None  # set for a site that gets its own attribute in a rewritten block

    @property
    def owner_and_attr(self) -> Tuple[nn.Module, str]:
        parent_path, _, attr = self.node.target.rpartition(".")
        return self.block.get_submodule(parent_path), attr

    def describe(self) -> str:
        prefix = f"{self.block_path}." if self.block_path else ""
        if self.kind == "module":
            return f"'{prefix}{self.node.target}'"
        where = self.block_path or "the model"
        return f"{_function_name(self.node)} (node '{self.node.name}') in {where}.forward"


def _function_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    name = getattr(node.target, "__name__", str(node.target))
    if getattr(F, name, None) is node.target:
        return f"F.{name}"
    if getattr(torch, name, None) is node.target:
        return f"torch.{name}"
    return name


def _functional_type(node: fx.Node) -> Optional[Type[nn.Module]]:
    if node.op not in ("call_function", "call_method"):
        return None
    for cls, spellings in _FUNCTIONAL.items():
        for f in spellings:
            if node.op == "call_method" and isinstance(f, str) and node.target == f:
                return cls
            if node.op == "call_function" and not isinstance(f, str) and node.target is f:
                return cls
    return None


class _Model:
    """The traced blocks of a model and the questions the conversion asks of them."""

    def __init__(self, model: nn.Module, old: Tuple[Type[nn.Module], ...]):
        self.model = model
        self.graphs: Dict[int, fx.Graph] = {}  # id(block) -> graph
        self.paths: Dict[int, str] = {}  # id(block) -> its path (the first, if it has several)
        self.untraced: Dict[int, str] = {}  # id(block) -> why it has no graph
        self.callers: Dict[int, List[Tuple[nn.Module, fx.Node]]] = defaultdict(list)
        for path, block in model.named_modules():  # lists each object once
            self.paths[id(block)] = path
            if isinstance(block, (_Acon,) + old):
                continue
            if _is_torch_nn_builtin(block):
                if next(block.children(), None) is not None:
                    self.untraced[id(block)] = f"{type(block).__name__} is a torch.nn module, not traced"
                continue
            try:
                graph = _OneLevelTracer().trace(block)
            except Exception as error:  # fx raises many kinds on untraceable code
                self.untraced[id(block)] = f"{type(error).__name__}: {error}".splitlines()[0]
                continue
            self.graphs[id(block)] = graph
            for node in graph.nodes:
                if node.op == "call_module":
                    self.callers[id(block.get_submodule(node.target))].append((block, node))

    def block_of(self, block_id: int) -> nn.Module:
        return self.model.get_submodule(self.paths[block_id])

    # The channel axis, 1 or -1, that a node's output has; None if the graph
    # does not tell.
    def axis(self, block: nn.Module, node: Any, seen=None) -> Optional[int]:
        if not isinstance(node, fx.Node):
            return None
        seen = set() if seen is None else seen
        key = (id(block), node)
        if key in seen:
            return None
        seen.add(key)
        if node.op == "placeholder":
            return self._axis_of_block_input(block, node, seen)
        if node.op == "call_module":
            return self._axis_of_module_output(block, block.get_submodule(node.target), node, seen)
        if node.op == "call_function":
            target = node.target
            if target in _CHANNELS_FIRST_FUNCTIONS:
                return 1
            if target in _FEATURES_LAST_FUNCTIONS:
                return -1
            if target in (torch.cat, torch.concat):  # along any axis: the channel axis stays where it is
                return self._same_axis(block, list(node.args[0]), seen)
            if target is torch.permute:
                return _permuted(self.axis(block, node.args[0], seen), node.args[1:])
            if target is torch.flatten:
                return self._axis_after_flatten(block, node, seen)
            if target is operator.getitem:
                return self._axis_of_getitem(block, node, seen)
            if target in _AXIS_KEEPING_FUNCTIONS:
                return self._same_axis(block, _tensor_args(node), seen)
            return None
        if node.op == "call_method":
            if node.target == "permute":
                return _permuted(self.axis(block, node.args[0], seen), node.args[1:])
            if node.target == "flatten":
                return self._axis_after_flatten(block, node, seen)
            if node.target in ("chunk", "split", "tensor_split", "unbind"):
                return None
            if node.target in _AXIS_KEEPING_METHODS:
                return self._same_axis(block, _tensor_args(node), seen)
        return None

    def _same_axis(self, block, nodes, seen) -> Optional[int]:
        """The axis the decided inputs agree on (an undecided one, like the
        block's input in ``out + identity``, does not object)."""
        axes = {self.axis(block, n, seen) for n in nodes if isinstance(n, fx.Node)}
        axes.discard(None)
        return axes.pop() if len(axes) == 1 else None

    def _axis_after_flatten(self, block, node, seen) -> Optional[int]:
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        axis = self.axis(block, node.args[0], seen)
        return 1 if axis == 1 and isinstance(start, int) and start >= 2 else None

    def _axis_of_getitem(self, block, node, seen) -> Optional[int]:
        source, index = node.args
        if isinstance(source, fx.Node) and source.op == "call_method" and source.target in ("chunk", "split"):
            return self.axis(block, source.args[0], seen)  # pieces keep their axes
        if isinstance(source, fx.Node) and source.target in (torch.chunk, torch.split):
            return self.axis(block, source.args[0], seen)
        index = index if isinstance(index, tuple) else (index,)
        if all(isinstance(i, slice) or i is Ellipsis for i in index):
            return self.axis(block, source, seen)
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
            return self.axis(block, node.args[0] if node.args else None, seen)
        if type(module).__name__ == "Permute" and hasattr(module, "dims"):  # torchvision.ops.Permute
            return _permuted(self.axis(block, node.args[0], seen), (list(module.dims),))
        if isinstance(module, nn.Flatten):
            axis = self.axis(block, node.args[0], seen)
            return 1 if axis == 1 and module.start_dim >= 2 else None
        graph = self.graphs.get(id(module))
        if graph is None:
            return None
        output = next(n for n in graph.nodes if n.op == "output")
        return self.axis(module, output.args[0], seen)

    def _axis_of_block_input(self, block, placeholder, seen) -> Optional[int]:
        position = [n for n in placeholder.graph.nodes if n.op == "placeholder"].index(placeholder)
        axes = set()
        for caller, call in self.callers.get(id(block), []):
            arg = call.args[position] if position < len(call.args) else call.kwargs.get(placeholder.target)
            axes.add(self.axis(caller, arg, seen))
        return axes.pop() if len(axes) == 1 else None


def _tensor_args(node: fx.Node) -> List[fx.Node]:
    return [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]


def _permuted(axis: Optional[int], dims_args) -> Optional[int]:
    dims = dims_args[0] if len(dims_args) == 1 and isinstance(dims_args[0], (list, tuple)) else dims_args
    if axis is None or not all(isinstance(d, int) for d in dims):
        return None
    rank = len(dims)
    dims = [d % rank for d in dims]
    position = dims.index(1 if axis == 1 else rank - 1)
    if position == rank - 1:
        return -1
    return 1 if position == 1 else None


def _activation_census(model: nn.Module, info: _Model) -> str:
    counts: Counter = Counter()
    activation_module = nn.modules.activation.__name__
    for m in model.modules():
        cls = type(m)
        if cls.__module__ == activation_module and cls is not nn.MultiheadAttention:
            counts[cls.__name__] += 1
    for graph in info.graphs.values():
        for node in graph.nodes:
            if _functional_type(node) is not None:
                counts[_function_name(node)] += 1
    if not counts:
        return "found no activation modules or functions"
    return "found " + ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def _fresh_name(block: nn.Module, taken: set, base: str) -> str:
    k = 1
    while f"{base}_{k}" in taken or hasattr(block, f"{base}_{k}"):
        k += 1
    taken.add(f"{base}_{k}")
    return f"{base}_{k}"


def _input_used_after(site: _Site) -> bool:
    """Whether the site's input is read again after it (so an in-place
    activation's mutation is visible there)."""
    node, source = site.node, site.input
    if not isinstance(source, fx.Node):
        return False
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return any(order[user] > order[node] for user in source.users)


def _depends_on_training_mode(block: nn.Module, graph: fx.Graph) -> bool:
    """Whether the block's forward traces differently in the other mode than
    it did (its `graph`, traced in the current mode)."""
    mode = block.training
    try:
        block.training = not mode
        other = _OneLevelTracer().trace(block)
    finally:
        block.training = mode
    return other.python_code("self").src != graph.python_code("self").src


def _rewrite(block: nn.Module, graph: fx.Graph, sites: List[_Site], modules: Dict[int, nn.Module]) -> fx.GraphModule:
    """The block as a GraphModule that calls its own module at each rewritten site."""
    rewritten = fx.GraphModule(block, graph, class_name=type(block).__name__)
    order = {n: i for i, n in enumerate(graph.nodes)}
    # GraphModule copies only what the graph uses (a nested target gets a
    # stub parent); the block's own children, parameters and buffers are put
    # back as they are, so its state_dict keys stay.
    for name, child in block.named_children():
        setattr(rewritten, name, child)
    for site in sites:
        node = site.node
        rewritten.add_module(site.new_name, modules[id(site)])
        if site.inplace and isinstance(site.input, fx.Node):
            # The ACON module returns a new tensor: whatever read the input
            # after an in-place activation reads the activation's result.
            for user in list(site.input.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(site.input, node)
        node.op = "call_module"
        node.target = site.new_name
        node.args = (site.input,)
        node.kwargs = {}
    for name, p in block._parameters.items():
        if name not in rewritten._parameters and not hasattr(rewritten, name):
            rewritten.register_parameter(name, p)
    for name, b in block._buffers.items():
        if name not in rewritten._buffers and not hasattr(rewritten, name):
            rewritten.register_buffer(name, b, persistent=name not in block._non_persistent_buffers_set)
    graph.lint()
    rewritten.recompile()
    rewritten.train(block.training)
    return rewritten


def _count_calls(model: nn.Module, modules: List[nn.Module], example: tuple) -> Dict[int, int]:
    calls: Counter = Counter()
    hooks = [m.register_forward_hook(lambda m, i, o: calls.update([id(m)])) for m in modules]
    try:
        _dry_run(model, example)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _dry_run(model: nn.Module, example: tuple) -> None:
    """One forward pass in eval mode without gradients: lazy modules take their
    widths, and no BatchNorm statistics move."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for m, mode in modes.items():
            m.training = mode


def convert_activations(
    model: nn.Module,
    old: Union[Type[nn.Module], Sequence[Type[nn.Module]]] = (nn.ReLU, nn.SiLU),
    new: Union[str, Callable[..., nn.Module]] = "acon_c",
    *,
    share: bool = False,
    example_input: Any = None,
    **kwargs,
) -> nn.Module:
    """Replaces every activation of a type in ``old`` inside ``model`` with a
    new ACON module, one per call site; returns the converted model.

    Args:
        model: the model, converted in place. Use the returned model: it is
            ``model`` itself unless ``model``'s own ``forward`` had to be
            rewritten (see below).
        old: an activation module class or a tuple of them. Their functional
            forms (``F.relu``, ``torch.relu``, ``x.relu()`` for ``nn.ReLU``,
            ``F.silu`` for ``nn.SiLU``, ``F.gelu`` for ``nn.GELU``, ...) called
            in a block's ``forward`` are sites too.
        new: "acon_a", "acon_b", "acon_c" or "meta_acon_c", built lazily with
            ``**kwargs`` (e.g. ``init="swish"``) on the device and dtype of the
            model's parameters; or a callable returning a fresh module (then
            ``kwargs`` must be empty; it is passed ``channel_dim=`` if its
            signature has that parameter).
        share: False (default): every call site gets its own module. True:
            one module per activation module object, shared by the places that
            call it (each functional call still gets its own).
        example_input: a tensor (or a tuple of ``forward``'s arguments). When
            given, one forward pass in eval mode without gradients materialises
            the new lazy modules, so the returned model has no lazy parameters.
        kwargs: passed to the new modules. ``channel_dim=`` here overrides the
            axis found for every site.

    Sites: each block is traced with ``torch.fx`` one level deep. A module
    called at k places in its parent's ``forward`` (torchvision's
    ``Bottleneck`` calls ``self.relu`` three times) is k sites; the first keeps
    the attribute's name (``layer1.0.relu``), the others are new attributes of
    the parent named ``relu_1``, ``relu_2``, ...; a functional call gets an
    attribute named after the activation (``relu_1``, ``gelu_1``, ...). A parent
    that gains attributes is rewritten as a ``torch.fx.GraphModule`` of the
    same class name and the same parameters, buffers and children (its
    forward hooks and Python class are not kept). The names depend on the
    architecture only, so a checkpoint of a converted model loads with
    ``strict=True`` into a fresh conversion of the same architecture.

    Channel axis: from the operation that produces the site's input. After a
    convolution, BatchNorm, GroupNorm or pooling it is 1; after ``nn.Linear``,
    a last-axis ``LayerNorm`` or a permute that moves channels last it is -1;
    elementwise operations (``out + identity``), dropout, casts and
    containers pass it on. Where the graph does not decide it, a ValueError
    names the site and asks for ``channel_dim=``.

    Raises ValueError when no site of ``old`` is found (naming the activation
    types the model does use), when a site's channel axis cannot be decided,
    and when a shared module sits in a block that ``torch.fx`` cannot trace
    (pass ``share=True``, or ``example_input`` to count its calls).
    Activations in untraceable blocks of your own code are reported by a
    warning.
    """
    types = (old,) if isinstance(old, type) else tuple(old) if isinstance(old, (tuple, list, set)) else None
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(f"convert_activations: old must be an nn.Module class or a tuple of them, got {old!r}")
    old = types
    if example_input is not None and not isinstance(example_input, tuple):
        example_input = (example_input,)
    axis_given = "channel_dim" in kwargs
    if isinstance(new, str):
        if new not in _NEW:
            raise ValueError(f"convert_activations: new must be one of {sorted(_NEW)} or a callable, got {new!r}")
        cls = _NEW[new]
        reference_param = next((p for p in model.parameters() if p.is_floating_point()), None)
        if reference_param is not None:
            kwargs.setdefault("device", reference_param.device)
            kwargs.setdefault("dtype", reference_param.dtype)

        def make(channel_dim):
            options = dict(kwargs)
            options.setdefault("channel_dim", channel_dim)
            return cls(**options)

        make(1)  # bad kwargs fail here, before the model is touched
    elif callable(new):
        if kwargs:
            raise TypeError("convert_activations: keyword arguments go with a named new module, not a callable")
        try:
            takes_axis = "channel_dim" in inspect.signature(new).parameters
        except (TypeError, ValueError):
            takes_axis = False

        def make(channel_dim):
            module = new(channel_dim=channel_dim) if takes_axis else new()
            if not isinstance(module, nn.Module):
                raise TypeError(f"convert_activations: new() returned {type(module).__name__}, not a module")
            return module

    else:
        raise TypeError(f"convert_activations: new must be a name or a callable, got {new!r}")
    functional_old = {t for t in old if t in _FUNCTIONAL}

    info = _Model(model, old)

    # Every site, in the order of named_modules() and then of each graph.
    sites: List[_Site] = []
    for block_id, graph in info.graphs.items():
        block = info.block_of(block_id)
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(block.get_submodule(node.target), old):
                sites.append(_Site(info.paths[block_id], block, graph, node, "module"))
            elif _functional_type(node) in functional_old:
                sites.append(_Site(info.paths[block_id], block, graph, node, "function"))

    # Activation modules no traced graph calls: children of untraceable blocks.
    called = {id(s.block.get_submodule(s.node.target)) for s in sites if s.kind == "module"}
    orphans: List[Tuple[str, nn.Module, nn.Module, str]] = []  # (path, parent, module, attr)
    for parent_path, parent in model.named_modules():
        if id(parent) not in info.untraced:
            continue
        for attr, child in parent.named_children():
            if isinstance(child, old) and id(child) not in called:
                path = f"{parent_path}.{attr}" if parent_path else attr
                orphans.append((path, parent, child, attr))
    for parent_id, why in info.untraced.items():
        parent = info.block_of(parent_id)
        if not _is_torch_nn_builtin(parent) and functional_old:
            warnings.warn(
                f"convert_activations: torch.fx cannot trace '{info.paths[parent_id]}' ({type(parent).__name__}: "
                f"{why}); functional activations in its forward, if any, are not converted",
                stacklevel=2,
            )
    if orphans and not share:
        counts = _count_calls(model, [o[2] for o in orphans], example_input) if example_input else None
        for path, parent, child, _ in orphans:
            if counts is None or counts[id(child)] > 1:
                why = info.untraced[id(parent)]
                seen = "" if counts is None else f" it ran {counts[id(child)]} times in the example's forward;"
                raise ValueError(
                    f"convert_activations: cannot tell the call sites of '{path}':{seen} torch.fx cannot trace "
                    f"its parent ({why}). Pass share=True to give it one ACON module shared by every place that "
                    "calls it" + ("" if counts is not None else ", or example_input= to count its calls")
                )

    if not sites and not orphans:
        names = ", ".join(t.__name__ for t in old)
        raise ValueError(
            f"convert_activations: the model has no activation of type {names}; {_activation_census(model, info)}. "
            "Pass old= with the types to replace (e.g. old=nn.ReLU6)"
        )

    # The channel axis of each site.
    undecided = []
    for site in sites:
        site.channel_dim = None if axis_given else info.axis(site.block, site.input)
        if site.channel_dim is None and not axis_given:
            undecided.append(site)
    if orphans and not axis_given:
        undecided += [o[0] for o in orphans]
    if undecided:
        names = ", ".join(s if isinstance(s, str) else s.describe() for s in undecided[:5])
        more = f" and {len(undecided) - 5} more" if len(undecided) > 5 else ""
        raise ValueError(
            f"convert_activations: cannot tell the channel axis of the input of {names}{more} from the model "
            "(what produces it is neither a convolution or normalisation of (N, C, ...) data nor a Linear or "
            "LayerNorm of features-last data). Pass channel_dim=1 or channel_dim=-1"
        )

    # Which sites keep their attribute and which get a new one.
    modules: Dict[int, nn.Module] = {}  # id(site) -> its new module
    in_place: List[Tuple[nn.Module, str, nn.Module]] = []  # (owner, attr, new module)
    first_of_path: Dict[Tuple[int, str], _Site] = {}
    first_of_object: Dict[int, nn.Module] = {}
    taken: Dict[int, set] = defaultdict(set)
    to_rewrite: Dict[int, List[_Site]] = defaultdict(list)
    for site in sites:
        if site.kind == "module":
            owner, attr = site.owner_and_attr
            original = getattr(owner, attr)
            if share and id(original) in first_of_object:
                modules[id(site)] = first_of_object[id(original)]
            else:
                modules[id(site)] = make(site.channel_dim)
                first_of_object.setdefault(id(original), modules[id(site)])
            key = (id(owner), attr)
            needs_rewrite = site.inplace and _input_used_after(site)
            if key not in first_of_path and not needs_rewrite:
                first_of_path[key] = site
                in_place.append((owner, attr, modules[id(site)]))
                continue
            if share and not needs_rewrite:
                continue  # the shared module is already at that path
            base = site.node.target.replace(".", "_")
        else:
            modules[id(site)] = make(site.channel_dim)
            base = _function_name(site.node).split(".")[-1].rstrip("_")
        site.new_name = _fresh_name(site.block, taken[id(site.block)], base)
        to_rewrite[id(site.block)].append(site)
    for path, parent, child, attr in orphans:
        if share and id(child) in first_of_object:
            in_place.append((parent, attr, first_of_object[id(child)]))
        else:
            first_of_object[id(child)] = make(kwargs.get("channel_dim", 1))
            in_place.append((parent, attr, first_of_object[id(child)]))

    # A rewritten block runs its traced graph, which froze whatever its
    # forward decided from self.training (F.dropout(..., self.training), an
    # auxiliary head): refuse those, before anything is touched.
    for block_id, block_sites in to_rewrite.items():
        block = block_sites[0].block
        if _depends_on_training_mode(block, block_sites[0].graph):
            raise ValueError(
                f"convert_activations: '{info.paths[block_id] or 'the model'}' ({type(block).__name__}) would be "
                "rewritten to give its activation call sites modules of their own, but its forward depends on "
                "train/eval mode, which the rewritten graph would freeze. Replace its functional or shared "
                "activations by separate modules, or leave their type out of old="
            )

    # Apply: in-place swaps first, so that rewritten blocks copy them.
    for owner, attr, module in in_place:
        setattr(owner, attr, module)
    replacements: Dict[int, nn.Module] = {}
    for block_id, block_sites in to_rewrite.items():
        block = block_sites[0].block
        replacements[block_id] = _rewrite(block, block_sites[0].graph, block_sites, modules)
    model = replacements.get(id(model), model)
    changed = True
    while changed:  # a rewritten block may hold others that were rewritten
        changed = False
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if id(child) in replacements and replacements[id(child)] is not child:
                    setattr(parent, name, replacements[id(child)])
                    changed = True

    if example_input is not None:
        _dry_run(model, example_input)
    return model
