"""``convert_activations``: swap the activations of an existing model for ACON,
one module per call site, each on the channel axis its input has.

It runs in phases:

1. Trace: every block (a module with children, or a user-defined module) is
   traced by ``torch.fx`` one level deep, its submodules left as calls.
2. Find sites: the graphs tell where each activation is applied (a module
   object called at three places is three sites; ``F.relu(x)`` in a
   ``forward`` is a site). Activation modules of blocks that cannot be traced
   are found as children instead.
3. Plan: a site whose path (parent, attribute) is used once is swapped in
   place; a block with extra sites (a shared module, a functional call) must
   be rewritten as an ``fx.GraphModule`` that calls a module of its own for
   each of them. A block whose forward uses what a graph cannot hold (grad
   mode, autocast, checkpointing, a custom autograd Function) is not
   rewritten: its extra sites are left, with a warning.
4. Decide axes: the operation that produced each site's input decides its
   channel axis (``channel_axis.py``).
5. Rewrite: the new modules are built and put in place.
"""

import contextlib
import cProfile
import dis
import functools
import inspect
import os
import re
import sys
import warnings
from collections import Counter, defaultdict
from types import CodeType
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .channel_axis import ELEMENTWISE_ACTIVATIONS, ChannelAxes
from .modules import AconA, AconB, AconC, MetaAconC, _Acon

__all__ = ["convert_activations"]

_NEW = {"acon_a": AconA, "acon_b": AconB, "acon_c": AconC, "meta_acon_c": MetaAconC}
_INPLACE_FUNCTIONS = (F.relu_, torch.relu_, "relu_", F.leaky_relu_, F.elu_)
# Module types that are not activations: as old= they would match whole models.
_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)

Factory = Callable[[Optional[int]], nn.Module]


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
            rewritten (see below), or ``model`` is itself an activation of a
            type in ``old`` (then the new module is returned).
        old: an activation module class or a tuple of them. Their functional
            forms (``F.relu``, ``torch.relu``, ``x.relu()`` for ``nn.ReLU``,
            ``F.silu`` for ``nn.SiLU``, ``F.gelu`` for ``nn.GELU``, ...) called
            in a block's ``forward`` are sites too.
        new: "acon_a", "acon_b", "acon_c" or "meta_acon_c", built lazily with
            ``**kwargs`` (e.g. ``init="swish"``) on the device and dtype of the
            model's parameters; or a callable returning a fresh module (then
            ``kwargs`` may hold ``channel_dim`` only; it is passed
            ``channel_dim=`` if its signature has that parameter).
        share: False (default): every call site gets its own module. True:
            one module per activation module object, shared by the places that
            call it (each functional call still gets its own).
        example_input: a tensor (or a tuple of ``forward``'s arguments). When
            given, one forward pass in eval mode without gradients checks it
            before the model is touched, and another one afterwards
            materialises the new lazy modules, so the returned model has no
            lazy parameters.
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

    A graph holds the tensor operations only: a parent whose ``forward`` uses
    ``torch.no_grad()``, autocast, ``torch.utils.checkpoint``, a custom
    ``autograd.Function`` or another context manager is not rewritten. A
    warning names it and the sites left unconverted there (its functional
    calls, and its modules called at several places unless ``share=True``);
    its modules called once are swapped in place.

    Channel axis: from the operation that produces the site's input. After a
    convolution, BatchNorm, GroupNorm or pooling it is 1; after ``nn.Linear``,
    a last-axis ``LayerNorm`` or a permute that moves channels last it is -1;
    elementwise operations (``out + identity``), dropout, casts and
    containers pass it on. Where the graph does not decide it, a ValueError
    names the site and asks for ``channel_dim=``.

    Raises TypeError or ValueError naming the argument when one is not what
    it should be; ValueError when no site of ``old`` is found (naming the
    activation types the model does use), when a site's channel axis cannot
    be decided, and when a shared module sits in a block that ``torch.fx``
    cannot trace (pass ``share=True``, or ``example_input`` to count its
    calls). A warning names an untraceable block of your own code whose
    forward may apply activations functionally (they are left), or whose
    in-place activation modules are converted (ACON modules are not in place).
    """
    _check_model(model)
    old = _activation_types(old)
    example = _example_args(example_input)
    if not isinstance(share, bool):
        raise TypeError(f"convert_activations: share must be True or False, got {share!r}")
    make, takes_axis = _module_factory(model, new, kwargs)
    axis_given = "channel_dim" in kwargs
    if isinstance(model, old):
        return _convert_the_activation_itself(model, make, takes_axis, axis_given, example)

    # 1. Trace.
    traced = _TracedModel(model, old)
    # 2. Find sites.
    sites = _find_sites(traced, old)
    orphans = _find_orphans(model, traced, old, sites)
    for block_id in traced.untraced:
        note = _untraced_note(traced, block_id, old, orphans)
        if note:
            warnings.warn(note, stacklevel=2)
    calls = _run_example(model, example, [o.module for o in orphans]) if example is not None else None
    if orphans and not share:
        _refuse_orphans_called_twice(traced, orphans, calls)
    if not sites and not orphans:
        names = ", ".join(t.__name__ for t in old)
        raise ValueError(
            f"convert_activations: the model has no activation of type {names}; {_activation_census(model, traced)}. "
            "Pass old= with the types to replace (e.g. old=nn.ReLU6)"
        )
    # 3. Plan.
    plan = _plan(sites, share)
    # 4. Decide axes.
    _decide_axes(traced, plan, orphans, axis_given or not takes_axis)
    for own in plan.by_block("own").values():
        _refuse_mode_dependent(traced, own[0])
    # 5. Rewrite.
    modules = _build_modules(plan, orphans, make, share, kwargs.get("channel_dim", 1))
    for block_id, left in plan.by_block("left").items():
        warnings.warn(_left_note(traced, left, plan.frozen[block_id], share), stacklevel=2)
    model = _apply(model, plan, orphans, modules)
    if example is not None:
        _dry_run(model, example)
    return model


# --- Arguments -------------------------------------------------------------


def _check_model(model: Any) -> None:
    if isinstance(model, nn.Module):
        return
    if isinstance(model, type) and issubclass(model, nn.Module):
        hint = f"; pass an instance, {model.__name__}(...)"
    elif callable(model):
        hint = f"; call {getattr(model, '__name__', 'it')}(...) to build the model first"
    else:
        hint = ""
    raise TypeError(f"convert_activations: model must be an nn.Module instance, got {_describe_value(model)}{hint}")


def _activation_types(old: Any) -> Tuple[Type[nn.Module], ...]:
    """`old` as a tuple of module classes; a TypeError or ValueError naming
    `old` for anything else."""
    items = tuple(old) if isinstance(old, (tuple, list, set, frozenset)) else (old,)
    if not items:
        raise ValueError("convert_activations: old is empty; pass an activation module class (e.g. nn.ReLU) or a tuple")
    for item in items:
        if isinstance(item, type) and issubclass(item, nn.Module):
            if item in _CONTAINERS:
                raise ValueError(
                    f"convert_activations: old takes activation module classes (e.g. nn.ReLU); {item.__name__} "
                    "would match whole blocks"
                )
            continue
        raise TypeError(
            "convert_activations: old must be an activation module class (e.g. nn.ReLU) or a tuple of them, "
            f"got {_describe_value(item)}{_old_hint(item)}"
        )
    return items


def _old_hint(item: Any) -> str:
    """What the user probably meant by `item` as an element of `old`."""
    if isinstance(item, nn.Module):
        return f"; pass its class, old={_class_name(type(item))}"
    for cls, spellings in ELEMENTWISE_ACTIVATIONS.items():
        if any(s is item for s in spellings if not isinstance(s, str)):
            return f"; pass old={_class_name(cls)}: its functional forms ({item.__name__} among them) go with it"
    if isinstance(item, str):
        match = [c for c in ELEMENTWISE_ACTIVATIONS if c.__name__.lower() == item.lower()]
        if match:
            return f"; pass the class, old={_class_name(match[0])}"
    return ""


def _class_name(cls: type) -> str:
    return f"nn.{cls.__name__}" if getattr(nn, cls.__name__, None) is cls else cls.__name__


def _describe_value(value: Any) -> str:
    if isinstance(value, type):
        return f"the class {value.__name__}"
    if inspect.isroutine(value):
        return f"the function {getattr(value, '__name__', value)!s}"
    return f"{type(value).__name__} {value!r}" if isinstance(value, (str, int, float)) else f"a {type(value).__name__}"


def _example_args(example_input: Any, caller: str = "convert_activations") -> Optional[tuple]:
    """`example_input` as the tuple of forward's arguments (None if not given);
    `caller` names the function in the error."""
    if example_input is None or isinstance(example_input, tuple):
        return example_input
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    raise TypeError(
        f"{caller}: example_input must be a tensor or a tuple of forward's arguments, got "
        f"{_describe_value(example_input)} (one argument of another type goes in a tuple: example_input=(arg,))"
    )


def _module_factory(model: nn.Module, new: Any, kwargs: dict) -> Tuple[Factory, bool]:
    """The function that builds a site's new module from its channel axis, and
    whether the axis matters to it. Bad `new` values and bad keyword
    arguments fail here, before the model is touched."""
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

        try:
            make(1)  # bad keyword arguments fail here, before the model is touched
        except (TypeError, ValueError) as error:
            given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k not in ("device", "dtype"))
            kind = TypeError if isinstance(error, TypeError) else ValueError
            raise kind(f"convert_activations: new={new!r} ({cls.__name__}) with {given}: {error}") from error
        return make, True
    if isinstance(new, nn.Module):
        raise TypeError(
            "convert_activations: new must be a name or a callable that returns a fresh module, got an instance "
            f"of {type(new).__name__}: one module cannot serve every site. Pass new={type(new).__name__} or "
            "new=lambda: ..."
        )
    if not callable(new):
        raise TypeError(
            f"convert_activations: new must be a name ({', '.join(sorted(_NEW))}) or a callable, got {new!r}"
        )
    try:
        takes_axis = "channel_dim" in inspect.signature(new).parameters
    except (TypeError, ValueError):
        takes_axis = False
    if set(kwargs) - {"channel_dim"}:
        raise TypeError("convert_activations: keyword arguments go with a named new module, not a callable")
    if kwargs and not takes_axis:
        raise TypeError(f"convert_activations: channel_dim= is given, but new={new!r} takes no channel_dim")
    name = getattr(new, "__name__", repr(new))

    def make(channel_dim):
        try:
            module = new(channel_dim=kwargs.get("channel_dim", channel_dim)) if takes_axis else new()
        except TypeError as error:
            call = "new(channel_dim=...)" if takes_axis else "new()"
            raise TypeError(f"convert_activations: {call} failed for new={name}: {error}") from error
        if not isinstance(module, nn.Module):
            raise TypeError(f"convert_activations: new() returned {type(module).__name__}, not a module")
        return module

    return make, takes_axis


def _convert_the_activation_itself(
    model: nn.Module, make: Factory, takes_axis: bool, axis_given: bool, example: Optional[tuple]
) -> nn.Module:
    """`model` is an activation of a type in `old`: its replacement. Nothing
    produces its input, so the axis must be given where it matters."""
    if takes_axis and not axis_given:
        raise ValueError(
            f"convert_activations: the model is itself an activation ({type(model).__name__}): nothing in it tells "
            "the channel axis of its input. Pass channel_dim=1 or channel_dim=-1"
        )
    module = make(1)  # a given channel_dim overrides the 1
    module.train(model.training)
    if example is not None:
        _dry_run(module, example)
    return module


# --- 1. Trace --------------------------------------------------------------


class _OneLevelTracer(fx.Tracer):
    """Traces one block's own forward; every submodule it calls stays a call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _is_torch_nn_builtin(module: nn.Module) -> bool:
    """A torch.nn module other than nn.Sequential: not traced (some, like
    MultiheadAttention, cannot be), and its own forward calls no activation
    function of interest."""
    return type(module).__module__.startswith("torch.nn.") and not isinstance(module, nn.Sequential)


class _TracedModel:
    """The one-level graphs of a model's blocks, and what calls what."""

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
        self.axes = ChannelAxes(self.graphs, self.callers)

    def block_of(self, block_id: int) -> nn.Module:
        return self.model.get_submodule(self.paths[block_id])

    def describe(self, block: nn.Module) -> str:
        path = self.paths[id(block)]
        return f"'{path}' ({type(block).__name__})" if path else f"the model ({type(block).__name__})"


# What a traced graph cannot hold. Symbolic tracing runs a forward's Python
# with proxies and records the tensor operations only: a context manager's
# __enter__ and __exit__ run at trace time and leave nothing in the graph
# (grad mode, autocast), torch.utils.checkpoint and a custom autograd.Function
# are traced through (their recomputation and backward are lost), and a read
# of grad mode or autocast state is frozen at its trace-time value. To see
# them, a block is traced again under a profiler that records such calls made
# by the forward's own code, not by fx's machinery.
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FX_DIR = os.path.dirname(fx.__file__) + os.sep
# Python modules whose functions wrap what they call in autograd or autocast
# state (checkpoint, checkpoint_sequential, custom_fwd, custom_bwd).
_STATE_FILES = {
    os.path.abspath(torch.utils.checkpoint.__file__): "torch.utils.checkpoint",
    os.path.abspath(torch.amp.autocast_mode.__file__): "torch.amp.autocast_mode",
}
# torch builtins that set or read grad mode, autocast or inference mode.
_STATE_BUILTIN = re.compile(r"^_?(set|is|get|enter|exit)_\w*(grad|autocast|inference|dual_level)")
_WITH_OPCODES = {"SETUP_WITH", "BEFORE_WITH", "SETUP_ASYNC_WITH", "BEFORE_ASYNC_WITH"}


def _state_the_graph_drops(block: nn.Module) -> List[str]:
    """What the block's forward uses that a graph of it would not keep: the
    context managers it enters, the state functions it calls; empty if none."""
    found: Dict[str, None] = {}  # ordered set of descriptions
    recorded: Set[Any] = set()  # frames already reported: what runs inside them is theirs
    with_statements: Dict[CodeType, None] = {}  # code of the forward's own that has a `with`
    entered_from: Set[CodeType] = set()  # code that entered a Python context manager
    forward_codes = {f.__code__ for f in _wrappers(type(block).forward) if hasattr(f, "__code__")}

    def in_forward(frame) -> bool:
        """Whether `frame` runs within the traced forward (its own code or
        what it calls), rather than within fx's machinery (its proxies, the
        trace itself), an import, or something outside the trace."""
        while frame is not None:
            if frame in recorded:
                return False
            code = frame.f_code
            caller = frame.f_back
            if code in forward_codes and caller is not None and caller.f_code.co_filename.startswith(_FX_DIR):
                return True  # fx calling the forward: the region starts here
            if code.co_filename.startswith((_FX_DIR, "<frozen importlib")):
                return False
            frame = caller
        return False

    def watch(frame, event, arg):
        if event == "call":
            code = frame.f_code
            what = _state_call(frame)
            if what is not None:
                if in_forward(frame):
                    found[what] = None
                    recorded.add(frame)
                    if code.co_name in ("__enter__", "__aenter__"):
                        entered_from.add(frame.f_back.f_code)
            elif _restores_or_prepares_state(code):
                if in_forward(frame):
                    recorded.add(frame)  # what it calls belongs to a use reported (or to be reported) elsewhere
            elif not code.co_filename.startswith(_TORCH_DIR) and _has_with(code) and in_forward(frame):
                with_statements[code] = None
        elif event == "c_call":
            what = _state_builtin(arg)
            if what is not None and in_forward(frame):
                found[what] = None

    previous = sys.getprofile()
    if previous is not None and not callable(previous) and not isinstance(previous, cProfile.Profile):
        # A profiler written in C other than cProfile: it could not be put
        # back, so the forward is not watched and the block stays as it is.
        return [f"nothing that could be checked while {type(previous).__name__} profiles"]
    sys.setprofile(watch)
    try:
        _OneLevelTracer().trace(block)
    finally:
        if previous is None or callable(previous):
            sys.setprofile(previous)
        else:  # cProfile's: sys.getprofile() gives its object, which re-enables it
            sys.setprofile(None)
            previous.enable()
    for code in with_statements:
        if code not in entered_from:  # a context manager written in C: its __enter__ makes no Python call
            found[f"a with statement in {getattr(code, 'co_qualname', code.co_name)}"] = None
    return list(found)


def _state_call(frame) -> Optional[str]:
    """The description of a Python call that changes how what it runs is
    differentiated or cast, or None."""
    code = frame.f_code
    if code.co_name in ("__enter__", "__aenter__"):
        manager = frame.f_locals.get("self")
        target = type(manager)
        if target.__module__ == contextlib.__name__ and callable(getattr(manager, "func", None)):
            target = manager.func  # a @contextmanager function, rather than contextlib's wrapper
        return f"the context manager {getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
    if code.co_name == "apply" and code.co_filename == getattr(torch.autograd.function, "__file__", None):
        cls = frame.f_locals.get("cls")  # Function.apply written in Python (older torch)
        return f"the custom autograd.Function {getattr(cls, '__name__', '?')}"
    module = _state_module(code.co_filename)
    if module and not code.co_name.startswith("__"):  # a context manager's methods: its __enter__ tells
        return f"{module}.{getattr(code, 'co_qualname', code.co_name).split('.<locals>')[0]}"
    return None


def _restores_or_prepares_state(code: CodeType) -> bool:
    """Whether the code is a context manager's __exit__ (which restores what
    its __enter__ set) or a dunder method of the modules in _STATE_FILES (like
    autocast's __init__, which reads state that its __enter__ then sets)."""
    if code.co_name in ("__exit__", "__aexit__"):
        return True
    return code.co_name.startswith("__") and _state_module(code.co_filename) is not None


@functools.lru_cache(maxsize=None)
def _state_module(filename: str) -> Optional[str]:
    """The name of the module in _STATE_FILES that `filename` is, or None."""
    return _STATE_FILES.get(os.path.abspath(filename))


def _state_builtin(function: Any) -> Optional[str]:
    """The description of a builtin call that sets or reads autograd or
    autocast state, or runs a custom autograd.Function; or None."""
    name = getattr(function, "__name__", "")
    owner = getattr(function, "__self__", None)
    if name == "apply" and isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        return f"the custom autograd.Function {owner.__name__}"
    module = getattr(function, "__module__", None) or ""
    if module.split(".")[0] == "torch" and _STATE_BUILTIN.match(name):
        return f"{module}.{name}"
    return None


def _wrappers(function: Any) -> Iterator[Any]:
    """`function` and, for a decorated one, the functions it wraps."""
    seen = set()
    while function is not None and id(function) not in seen:
        seen.add(id(function))
        yield function
        function = getattr(function, "__wrapped__", None)


@functools.lru_cache(maxsize=None)
def _has_with(code: CodeType) -> bool:
    return any(instruction.opname in _WITH_OPCODES for instruction in dis.get_instructions(code))


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


# --- 2. Find sites ---------------------------------------------------------


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

    @property
    def path_key(self) -> Tuple[int, str]:
        """The (parent, attribute) a module site calls, as a dictionary key."""
        owner, attr = self.owner_and_attr
        return id(owner), attr

    @property
    def original(self) -> nn.Module:
        """The activation module a module site calls."""
        return self.block.get_submodule(self.node.target)

    def describe(self) -> str:
        prefix = f"{self.block_path}." if self.block_path else ""
        if self.kind == "module":
            return f"'{prefix}{self.node.target}'"
        where = self.block_path or "the model"
        return f"{_function_name(self.node)} (node '{self.node.name}') in {where}.forward"


class _Orphan(NamedTuple):
    """An activation module that no graph calls: a child of an untraceable block."""

    path: str
    parent: nn.Module
    module: nn.Module
    attr: str


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
    for cls, spellings in ELEMENTWISE_ACTIVATIONS.items():
        for f in spellings:
            if node.op == "call_method" and isinstance(f, str) and node.target == f:
                return cls
            if node.op == "call_function" and not isinstance(f, str) and node.target is f:
                return cls
    return None


def _find_sites(traced: _TracedModel, old: Tuple[Type[nn.Module], ...]) -> List[_Site]:
    """Every site, in the order of named_modules() and then of each graph."""
    functional_old = {t for t in old if t in ELEMENTWISE_ACTIVATIONS}
    sites = []
    for block_id, graph in traced.graphs.items():
        block = traced.block_of(block_id)
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(block.get_submodule(node.target), old):
                sites.append(_Site(traced.paths[block_id], block, graph, node, "module"))
            elif _functional_type(node) in functional_old:
                sites.append(_Site(traced.paths[block_id], block, graph, node, "function"))
    return sites


def _find_orphans(
    model: nn.Module, traced: _TracedModel, old: Tuple[Type[nn.Module], ...], sites: List[_Site]
) -> List[_Orphan]:
    """Activation modules no traced graph calls: children of untraceable blocks."""
    called = {id(s.original) for s in sites if s.kind == "module"}
    orphans = []
    for parent_path, parent in model.named_modules():
        if id(parent) not in traced.untraced:
            continue
        for attr, child in parent.named_children():
            if isinstance(child, old) and id(child) not in called:
                path = f"{parent_path}.{attr}" if parent_path else attr
                orphans.append(_Orphan(path, parent, child, attr))
    return orphans


def _untraced_note(traced: _TracedModel, block_id: int, old, orphans: List[_Orphan]) -> Optional[str]:
    """The warning an untraceable block deserves, or None where it changes
    nothing: no functional activation of `old` in its forward's code, and no
    in-place activation module of it swapped for an ACON module."""
    block = traced.block_of(block_id)
    if _is_torch_nn_builtin(block):
        return None
    functions = _functional_activations_in_code(block, old)
    in_place = [o.path for o in orphans if o.parent is block and getattr(o.module, "inplace", False)]
    if not functions and not in_place:
        return None
    consequences = []
    if functions:
        consequences.append(
            f"the functional activations its forward may call ({', '.join(functions)}) are not converted"
        )
    if in_place:
        consequences.append(
            f"its in-place activations ({', '.join(repr(p) for p in in_place)}) become ACON modules, which leave "
            "their input as it is: a forward that reads the input again after one now sees it unactivated"
        )
    return (
        f"convert_activations: torch.fx cannot trace {traced.describe(block)}: {traced.untraced[block_id]}; "
        + "; ".join(consequences)
    )


def _functional_activations_in_code(block: nn.Module, old) -> List[str]:
    """The names of the functional activations of `old` that the block's
    forward may call, read from its code (it cannot be traced): the names it
    uses, those of the attributes it reads that hold such a function, and the
    same in the methods and functions of its own code that it calls."""
    spellings = [s for t in old for s in ELEMENTWISE_ACTIVATIONS.get(t, ())]
    names = {s if isinstance(s, str) else s.__name__ for s in spellings}
    submodules = dict(block.named_children())
    found: Dict[str, None] = {}
    seen: Set[CodeType] = set()

    def scan(function: Any, depth: int) -> None:
        function = inspect.unwrap(function) if callable(function) else function
        code = getattr(function, "__code__", None)
        if code is None or depth > 4:
            return
        for code in _code_objects(code):
            if code in seen:
                continue
            seen.add(code)
            for name in code.co_names:
                if name in submodules:
                    continue  # a module call: its activations are found as modules
                if name in names:
                    found[name] = None
                    continue
                if name == "getattr":
                    found["getattr (a lookup by name)"] = None
                    continue
                value = block.__dict__.get(name, getattr(type(block), name, None))
                if value is None:
                    value = getattr(function, "__globals__", {}).get(name)
                value = value.func if isinstance(value, functools.partial) else value
                if any(value is s for s in spellings if not isinstance(s, str)):
                    found[f"{name} = {value.__name__}"] = None
                elif inspect.isfunction(value) and not value.__code__.co_filename.startswith(_TORCH_DIR):
                    scan(value, depth + 1)

    scan(type(block).forward, 0)
    return list(found)


def _code_objects(code: CodeType) -> Iterator[CodeType]:
    """`code` and the code nested in it (lambdas, comprehensions, inner functions)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _code_objects(const)


def _run_example(model: nn.Module, example: tuple, watched: List[nn.Module]) -> Dict[int, int]:
    """Runs the example through the model before anything is changed; returns
    how many times each watched module ran."""
    calls: Counter = Counter()
    hooks = [m.register_forward_hook(lambda m, i, o: calls.update([id(m)])) for m in watched]
    try:
        _dry_run(model, example)
    except Exception as error:
        raise ValueError(
            f"convert_activations: the model cannot run example_input: {type(error).__name__}: {error}"
        ) from error
    finally:
        for h in hooks:
            h.remove()
    return calls


def _refuse_orphans_called_twice(traced: _TracedModel, orphans: List[_Orphan], calls: Optional[Dict[int, int]]):
    """Without share=True, a module of an untraceable block may be converted
    only if it runs once: it cannot be given a module per call."""
    for orphan in orphans:
        if calls is None or calls[id(orphan.module)] > 1:
            why = traced.untraced[id(orphan.parent)]
            seen = "" if calls is None else f" it ran {calls[id(orphan.module)]} times in the example's forward;"
            raise ValueError(
                f"convert_activations: cannot tell the call sites of '{orphan.path}':{seen} torch.fx cannot trace "
                f"its parent ({why}). Pass share=True to give it one ACON module shared by every place that "
                "calls it" + ("" if calls is not None else ", or example_input= to count its calls")
            )


def _activation_census(model: nn.Module, traced: _TracedModel) -> str:
    counts: Counter = Counter()
    activation_module = nn.modules.activation.__name__
    for m in model.modules():
        cls = type(m)
        if cls.__module__ == activation_module and cls is not nn.MultiheadAttention:
            counts[cls.__name__] += 1
    for graph in traced.graphs.values():
        for node in graph.nodes:
            if _functional_type(node) is not None:
                counts[_function_name(node)] += 1
    if not counts:
        return "found no activation modules or functions"
    return "found " + ", ".join(f"{name} x{n}" for name, n in counts.most_common())


# --- 3. Plan ---------------------------------------------------------------


class _Plan:
    """What happens to each site, by its role:

    "in_place": its new module replaces the original at its path;
    "sharing": (share=True) it calls a path already swapped in place;
    "own": it gets an attribute of its own, in its block rewritten as a
        GraphModule;
    "left": not converted, as it needs an attribute of its own in a block
        that cannot be rewritten (see frozen).
    """

    def __init__(self, sites: List[_Site]):
        self.sites = sites
        self.role: Dict[int, str] = {}  # id(site) -> its role
        self.frozen: Dict[int, List[str]] = {}  # id(block) -> what its forward uses that a graph would drop

    def having(self, *roles: str) -> List[_Site]:
        """The sites of these roles, in the order of the sites."""
        return [s for s in self.sites if self.role[id(s)] in roles]

    def by_block(self, role: str) -> Dict[int, List[_Site]]:
        """id(block) -> its sites of this role."""
        blocks: Dict[int, List[_Site]] = defaultdict(list)
        for site in self.having(role):
            blocks[id(site.block)].append(site)
        return blocks


def _plan(sites: List[_Site], share: bool) -> _Plan:
    """Which sites keep their path, which get an attribute of their own, and
    which are left because their block cannot be rewritten.

    A left module site calls the original module at its path, so that path
    keeps it: its other sites then need attributes of their own too (and are
    left in turn where their block cannot be rewritten either)."""
    drops: Dict[int, List[str]] = {}  # id(block) -> what a graph of it would drop ([] if nothing)
    kept_paths: Set[Tuple[int, str]] = set()
    while True:
        plan = _assign(sites, share, kept_paths)
        newly_kept = set()
        for block_id, own in plan.by_block("own").items():
            if block_id not in drops:
                drops[block_id] = _state_the_graph_drops(own[0].block)
            if drops[block_id]:
                plan.frozen[block_id] = drops[block_id]
                for site in own:
                    plan.role[id(site)] = "left"
                newly_kept |= {s.path_key for s in own if s.kind == "module"}
        if newly_kept <= kept_paths:
            return plan
        kept_paths |= newly_kept


def _assign(sites: List[_Site], share: bool, kept_paths: Set[Tuple[int, str]]) -> _Plan:
    """The roles of the sites when the paths in `kept_paths` keep their
    original module, as if every block could be rewritten."""
    plan = _Plan(sites)
    claimed: Set[Tuple[int, str]] = set()
    taken: Dict[int, set] = defaultdict(set)
    for site in sites:
        if site.kind == "module":
            key = site.path_key
            # An in-place activation whose input is read again needs a graph
            # edit (the readers read its result), so it cannot stay at its path.
            needs_own = site.inplace and _input_used_after(site) or key in kept_paths
            if not needs_own and key not in claimed:
                claimed.add(key)
                plan.role[id(site)] = "in_place"
                continue
            if share and not needs_own:
                plan.role[id(site)] = "sharing"
                continue
            base = site.node.target.replace(".", "_")
        else:
            base = _function_name(site.node).split(".")[-1].rstrip("_")
        site.new_name = _fresh_name(site.block, taken[id(site.block)], base)
        plan.role[id(site)] = "own"
    return plan


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


def _refuse_mode_dependent(traced: _TracedModel, site: _Site) -> None:
    """A rewritten block runs its traced graph, which froze whatever its
    forward decided from self.training (F.dropout(..., self.training), an
    auxiliary head): refuse those, before anything is touched."""
    if _depends_on_training_mode(site.block, site.graph):
        raise ValueError(
            f"convert_activations: {traced.describe(site.block)} would be rewritten to give its activation call "
            "sites modules of their own, but its forward depends on train/eval mode, which the rewritten graph "
            "would freeze. Replace its functional or shared activations by separate modules, or leave their type "
            "out of old="
        )


def _left_note(traced: _TracedModel, left: List[_Site], drops: List[str], share: bool) -> str:
    """The warning for a block that cannot be rewritten, naming its `left` sites."""
    counts = Counter(s.describe() for s in left)
    names = [name if n == 1 else f"{name} ({n} calls)" for name, n in counts.items()]
    listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    hint = ""
    if not share and any(s.kind == "module" for s in left):
        hint = " (share=True converts a module called at several places in place, one ACON module for all)"
    return (
        f"convert_activations: {traced.describe(left[0].block)} is left as it is, not rewritten as a GraphModule: its "
        f"forward uses {', '.join(drops)}, which a traced graph would drop. Its activation sites that need a "
        f"module of their own are not converted: {listed}{hint}"
    )


# --- 4. Decide axes --------------------------------------------------------


def _decide_axes(traced: _TracedModel, plan: _Plan, orphans: List[_Orphan], axis_given: bool) -> None:
    """Sets each converted site's channel axis; a ValueError names those the
    graphs do not decide, unless the axis is settled for all (channel_dim=
    given, or a `new` that takes none)."""
    if axis_given:
        return
    undecided: List[str] = []
    for site in plan.having("in_place", "sharing", "own"):
        site.channel_dim = traced.axes.of(site.block, site.input)
        if site.channel_dim is None:
            undecided.append(site.describe())
    undecided += [o.path for o in orphans]
    if undecided:
        names = ", ".join(undecided[:5])
        more = f" and {len(undecided) - 5} more" if len(undecided) > 5 else ""
        raise ValueError(
            f"convert_activations: cannot tell the channel axis of the input of {names}{more} from the model "
            "(what produces it is neither a convolution or normalisation of (N, C, ...) data nor a Linear or "
            "LayerNorm of features-last data). Pass channel_dim=1 or channel_dim=-1"
        )


# --- 5. Rewrite ------------------------------------------------------------


def _build_modules(
    plan: _Plan, orphans: List[_Orphan], make: Factory, share: bool, given_axis: int
) -> Dict[int, nn.Module]:
    """id(site or orphan) -> its new module; with share, one per original object."""
    modules: Dict[int, nn.Module] = {}
    first_of_object: Dict[int, nn.Module] = {}
    for site in plan.having("in_place", "own"):
        if site.kind == "module" and share and id(site.original) in first_of_object:
            modules[id(site)] = first_of_object[id(site.original)]
            continue
        modules[id(site)] = make(site.channel_dim)
        if site.kind == "module":
            first_of_object.setdefault(id(site.original), modules[id(site)])
    for orphan in orphans:
        if not (share and id(orphan.module) in first_of_object):
            first_of_object[id(orphan.module)] = make(given_axis)
        modules[id(orphan)] = first_of_object[id(orphan.module)]
    return modules


def _apply(model: nn.Module, plan: _Plan, orphans: List[_Orphan], modules: Dict[int, nn.Module]) -> nn.Module:
    """Puts the new modules in; returns the model (a new object if its own
    forward was rewritten)."""
    # In-place swaps first, so that rewritten blocks copy them.
    for site in plan.having("in_place"):
        owner, attr = site.owner_and_attr
        setattr(owner, attr, modules[id(site)])
    for orphan in orphans:
        setattr(orphan.parent, orphan.attr, modules[id(orphan)])
    replacements: Dict[int, nn.Module] = {}
    for block_id, own in plan.by_block("own").items():
        replacements[block_id] = _rewrite(own[0].block, own[0].graph, own, modules)
    model = replacements.get(id(model), model)
    changed = True
    while changed:  # a rewritten block may hold others that were rewritten
        changed = False
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if id(child) in replacements and replacements[id(child)] is not child:
                    setattr(parent, name, replacements[id(child)])
                    changed = True
    # The new modules take the mode of the block they are in, as if they had
    # been there when model.train() / model.eval() ran.
    new = {id(m) for m in modules.values()}
    for parent in model.modules():
        for child in parent.children():
            if id(child) in new:
                child.train(parent.training)
    return model


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
    # Not .train(): that would reset the mode of every child (a frozen
    # BatchNorm in eval inside a training model); the new modules take
    # theirs in _apply.
    rewritten.training = block.training
    return rewritten


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
        # Modules built during the run (a lazy MetaAconC's generator, in eval
        # mode then) take their parent's restored mode; modules() visits a
        # parent before its children.
        for parent in model.modules():
            for child in parent.children():
                if child not in modes:
                    child.training = parent.training
