"""``fuse_batchnorm``: each BatchNorm whose output goes only into an ACON
module computes the pair as one op, ``batch_norm_acon_c``.

Nothing is added or removed: the two modules change class in place.

- The BatchNorm becomes a subclass of its own class (cached, one per class)
  whose ``forward`` is ``_BatchNorm.forward`` (the same input check, momentum,
  ``num_batches_tracked`` and running-statistics rules) with the ACON module's
  ``(p1, p2, beta)`` passed to ``batch_norm_acon_c``. The ACON module is held
  in the BatchNorm's ``__dict__``, not registered as a child: no new
  ``state_dict`` key.
- The ACON module becomes a subclass of its class whose ``forward`` returns
  its input: its output is the BatchNorm's. Its parameters stay where they
  were, so ``state_dict`` keys and ``model.parameters()`` do not change.
- timm's ``BatchNormAct2d`` (a BatchNorm that applies its own ``act``) with an
  ACON ``act`` becomes a subclass of its class that applies ``act``'s
  parameters in the same op and does not call ``act``.

Which pairs are fused is read from ``torch.fx`` graphs of the model's blocks,
one level deep (``convert.py``'s ``_TracedModel``); a block whose graph would
not show everything (it cannot be traced, it enters grad-mode or autocast
regions, it stores on modules) is not trusted, and neither are the modules it
holds. A run of ``example_input`` can veto pairs, watching which op or module
reads each BatchNorm's output (``_Observer``).
"""

import re
import warnings
from collections import Counter, defaultdict
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.nn.parameter import UninitializedBuffer
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .batch_norm import batch_norm_acon_c
from .convert import (
    _dry_run,
    _example_args,
    _find_orphans,
    _function_name,
    _is_torch_nn_builtin,
    _OneLevelTracer,
    _state_the_graph_drops,
    _TracedModel,
)
from .meta_acon import batch_norm_meta_acon_c, batch_norm_meta_acon_c_serves
from .modules import AconA, AconB, AconC, MetaAconC, _Acon

__all__ = ["fuse_batchnorm", "fused_pairs", "unfuse_batchnorm"]

_FUSABLE_ACON = (AconA, AconB, AconC, MetaAconC)
_RUN_FIRST = "pass example_input= or run a forward pass first"


def fuse_batchnorm(model: nn.Module, example_input: Any = None) -> nn.Module:
    """Makes every BatchNorm whose output goes only into an ACON module
    (AconA, AconB, AconC or MetaAconC) compute BatchNorm and ACON as one op
    (``batch_norm_acon_c``; for MetaAconC ``batch_norm_meta_acon_c``, whose
    generator takes its means from the BatchNorm's statistics pass); returns
    ``model``, changed in place.

    The fused modules compute the same results as before, in train and eval
    mode: outputs, gradients, running statistics and ``num_batches_tracked``
    (in float64 equal to about 1e-12; the fused op sums in another order).
    Nothing is added or removed: the BatchNorm's class becomes a subclass of
    its own that applies the ACON module's parameters, and the ACON module's
    class a subclass of its own whose ``forward`` returns its input.
    ``state_dict`` keys and values, ``model.parameters()`` and ``isinstance``
    checks are as before, so checkpoints load into fused and unfused models
    alike. The reprs say what is fused with what; ``fused_pairs(model)``
    lists the pairs; ``unfuse_batchnorm(model)`` undoes it. Calling it again
    checks every pair again, as the model is then.

    A pair is fused only when all of these hold:

    - the BatchNorm is called once, in a forward that ``torch.fx`` can trace
      one level deep (in train and in eval mode, where the graphs differ)
      and that enters no grad-mode, autocast or checkpointing region and
      stores nothing on a module (a graph holds neither), and its output is
      read by one call of the ACON module and nothing else, directly or
      through ``nn.Identity`` modules (timm's ``drop_block`` and
      ``drop_path`` when off);
    - no block that cannot be traced holds either module (it could call
      them in ways no graph shows);
    - every call of the ACON module takes a fused BatchNorm's output (one
      ACON module after two BatchNorms is fine when both are fused);
    - the BatchNorm is an ``nn.BatchNorm1d/2d/3d`` or a subclass that keeps
      its ``forward`` (not ``SyncBatchNorm``, not an uninitialised lazy one),
      or timm's ``BatchNormAct2d`` whose ``act`` and ``drop`` are
      ``nn.Identity``;
    - the ACON module is an ``AconA``, ``AconB``, ``AconC`` or ``MetaAconC``
      with ``impl="fused"``, as wide as the BatchNorm, whose
      ``channel_dim`` is the BatchNorm's channel axis 1 for every input rank
      the BatchNorm takes, or that example_input gives it (``channel_dim=-1``
      after a BatchNorm1d fits (N, C) input, not (N, C, L); a fused pair
      given an input rank where it does not fit runs the two ops);
    - neither has forward, forward pre- or backward hooks (state-dict hooks
      are fine).

    timm's ``BatchNormAct2d`` whose own ``act`` is such an ACON module and
    whose ``drop`` is an ``nn.Identity`` is fused with it: it applies the
    ``act``'s parameters and does not call it (``act`` stays where it is,
    unchanged).

    Args:
        model: the model, changed in place.
        example_input: a tensor, or a tuple of ``forward``'s arguments. The
            model then runs once on it, in eval mode without gradients, its
            buffers and attributes restored afterwards (lazy modules take
            their widths, so lazily built ACON modules can be fused). The run
            can veto a pair (an op the graphs do not show reads the
            BatchNorm's output), never allow one: it shows one path through
            each forward, not the branches it did not take, so the pairs of
            blocks ``torch.fx`` cannot trace are left either way.

    One ``UserWarning`` names every BatchNorm -> ACON pair left unfused (a
    BatchNorm whose output an ACON module reads, or a BatchNorm next to an
    ACON module in a block that cannot be traced), and why; none when all
    were fused. A left pair computes as before, in two ops.

    Fuse last: changes to a fused model's modules (replacing or slicing
    them, ``nn.SyncBatchNorm.convert_sync_batchnorm``,
    ``convert_activations``, hooks added afterwards) are not seen, and the
    BatchNorm holds its ACON module; call ``unfuse_batchnorm`` first, then
    fuse again. ``nn.DataParallel`` replicas would share the original ACON
    module: use DistributedDataParallel.

    Raises TypeError when ``model`` is not a module or ``example_input`` not
    a tensor or tuple; ValueError when the model cannot run ``example_input``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_batchnorm: model must be an nn.Module instance, got {type(model).__name__}")
    example = _example_args(example_input, "fuse_batchnorm")
    # Pairs fused by an earlier call are checked again, as the model is now
    # (a caller may have fused a submodule alone, or changed the model).
    unfuse_batchnorm(model)
    analysis = _Analysis(model, example)
    fused, left = analysis.decide()
    for pair in fused:
        _fuse(pair, analysis)
    if left:
        warnings.warn(_left_note(left, analysis), stacklevel=2)
    return model


def fused_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """(BatchNorm path, ACON module path) of each pair ``fuse_batchnorm`` fused
    in ``model``, in the order of ``model.named_modules()``."""
    paths = {id(m): p for p, m in model.named_modules()}
    pairs = []
    for path, module in model.named_modules():
        if isinstance(module, _FusedBatchNorm):
            act = module._fused_acon if module._fused_acon is not None else module.act
            pairs.append((path, paths.get(id(act), module._fused_acon_path)))
    return pairs


def unfuse_batchnorm(model: nn.Module) -> nn.Module:
    """Undoes ``fuse_batchnorm``: every fused BatchNorm and ACON module of
    ``model`` gets its own class back and computes alone again. Returns
    ``model``, changed in place. Call it before changing a fused model's
    modules (``nn.SyncBatchNorm.convert_sync_batchnorm``,
    ``convert_activations``, replacing or slicing modules, adding hooks), and
    ``fuse_batchnorm`` after."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfuse_batchnorm: model must be an nn.Module instance, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, _Fused):
            module.__class__ = type(module)._unfused_class
            for name in ("_fused_acon", "_fused_acon_path", "_fused_into"):
                module.__dict__.pop(name, None)
    return model


# --- The fused classes -------------------------------------------------------


def _batch_norm_then_acon(bn: _BatchNorm, x: Tensor, act: _Acon) -> Tensor:
    """``_BatchNorm.forward`` after its input check (the same momentum,
    ``num_batches_tracked`` and running-statistics rules; timm's
    ``BatchNormAct2d.forward`` has the same), with ``act`` applied in the
    same op."""
    if bn.momentum is None:
        exponential_average_factor = 0.0
    else:
        exponential_average_factor = bn.momentum
    if bn.training and bn.track_running_stats:
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(bn.num_batches_tracked)
            else:
                exponential_average_factor = bn.momentum
    # Batch statistics in training mode, and in eval mode without buffers.
    if bn.training:
        bn_training = True
    else:
        bn_training = (bn.running_mean is None) and (bn.running_var is None)
    # The buffers are passed only where they are updated or used.
    keep_buffers = not bn.training or bn.track_running_stats
    running_mean = bn.running_mean if keep_buffers else None
    running_var = bn.running_var if keep_buffers else None
    norm_args = (running_mean, running_var, bn.weight, bn.bias, bn_training, exponential_average_factor, bn.eps)
    rank = x.dim()
    meta = isinstance(act, MetaAconC)
    if (
        not (-rank <= act.channel_dim < rank and act.channel_dim % rank == 1)
        or x.shape[1] != bn.num_features
        or not x.is_floating_point()
        or (meta and not batch_norm_meta_acon_c_serves(act, x))
    ):
        # An input rank where the ACON's axis is not the channels (a
        # BatchNorm1d fused for (N, C) input, given (N, C, L)), an input
        # the BatchNorm rejects, or a MetaAconC call the fused op does not
        # take (another device, tracing, autocast...): the two ops, as
        # unfused (and their errors).
        y = F.batch_norm(x, *norm_args)
        return getattr(type(act), "_unfused_class", type(act)).forward(act, y)
    if meta:
        return batch_norm_meta_acon_c(act, x, *norm_args)
    p1, p2, beta = act.acon_c_parameters()
    return batch_norm_acon_c(x, *norm_args, p1, p2, beta)


class _Fused:
    """Base of the mixins: pickling (``torch.save(model)``, ``copy.deepcopy``)
    rebuilds the fused class from the original one and the mixin."""

    _unfused_class: type
    _fused_mixin: type

    def __reduce_ex__(self, protocol):
        cls = type(self)
        return _rebuild_fused, (cls._unfused_class, cls._fused_mixin), self.__getstate__()


class _FusedBatchNorm(_Fused):
    """Mixin of a fused BatchNorm: ``_BatchNorm.forward`` with the ACON module
    ``self._fused_acon`` applied in the same op."""

    _fused_acon: Optional[_Acon]
    _fused_acon_path: str

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return _batch_norm_then_acon(self, input, self._fused_acon)

    def extra_repr(self) -> str:
        act = self._fused_acon if self._fused_acon is not None else self.act
        return f"{super().extra_repr()}, fused with {type(act).__name__} {self._fused_acon_path!r}"


class _FusedBatchNormAct(_FusedBatchNorm):
    """Mixin of a fused timm ``BatchNormAct2d``: its ``forward`` (the same
    input check; ``drop`` is an ``nn.Identity``) with its ``act``, or the ACON
    module after it (``self._fused_acon``), applied in the same op."""

    def forward(self, input: Tensor) -> Tensor:
        torch._assert(input.ndim == 4, f"expected 4D input (got {input.ndim}D input)")
        act = self._fused_acon if self._fused_acon is not None else self.act
        return _batch_norm_then_acon(self, input, act)


class _FusedAcon(_Fused):
    """Mixin of an ACON module fused into the BatchNorm(s) before it: they
    apply it, so it returns its input."""

    _fused_into: List[str]

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        into = ", ".join(repr(path) for path in self._fused_into)
        return f"{super().extra_repr()}, fused: applied by the BatchNorm {into}, returns its input"


_FUSED_CLASSES: Dict[Tuple[type, type], type] = {}


def _fused_class(base: type, mixin: type) -> type:
    """The cached subclass of `base` with `mixin`'s methods. It keeps base's
    name and module: tools that look at them (``torch.fx``'s leaf modules,
    ONNX scope names) see the class they know."""
    cls = _FUSED_CLASSES.get((base, mixin))
    if cls is None:
        attributes = {
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            "_unfused_class": base,
            "_fused_mixin": mixin,
        }
        cls = _FUSED_CLASSES[(base, mixin)] = type(base.__name__, (mixin, base), attributes)
    return cls


def _rebuild_fused(base: type, mixin: type) -> nn.Module:
    """An empty instance of the fused class (its state comes next)."""
    return object.__new__(_fused_class(base, mixin))


# --- Module rules --------------------------------------------------------------


def _norm_act_base(cls: type) -> Optional[type]:
    """timm's ``BatchNormAct2d`` among cls's bases (found by name: timm is not
    imported here), or None."""
    for base in cls.__mro__:
        if base.__name__ == "BatchNormAct2d" and base.__module__.split(".")[0] == "timm":
            return base
    return None


def _bn_kind(bn: _BatchNorm) -> Optional[str]:
    """ "plain" for a BatchNorm with ``_BatchNorm.forward``, "norm_act" for
    timm's ``BatchNormAct2d`` with its own forward, None for others."""
    forward = type(bn).forward
    if forward is _BatchNorm.forward:
        return "plain"
    base = _norm_act_base(type(bn))
    if base is not None and forward is base.forward:
        return "norm_act"
    return None


def _own_act(bn: _BatchNorm) -> Optional[_Acon]:
    """The ACON module that a timm ``BatchNormAct2d`` applies itself, or None."""
    if _bn_kind(bn) == "norm_act" and not isinstance(bn, _FusedBatchNorm):
        act = getattr(bn, "act", None)
        if isinstance(act, _Acon):
            return act
    return None


def _is_lazy_init_hook(hook: Any) -> bool:
    """LazyModuleMixin's own forward pre-hook, which an initialised module
    runs once to remove it."""
    return getattr(hook, "__func__", None) is LazyModuleMixin._infer_parameters


def _hooks(module: nn.Module) -> str:
    """The kinds of hooks that a fused module would skip or see differently,
    as words ("" if none)."""
    kinds = []
    if any(not _is_lazy_init_hook(h) for h in module._forward_pre_hooks.values()):
        kinds.append("a forward pre-hook")
    if module._forward_hooks:
        kinds.append("a forward hook")
    if module._backward_hooks or module._backward_pre_hooks:
        kinds.append("a backward hook")
    return " and ".join(kinds)


def _is_identity(module: Any) -> bool:
    """An nn.Identity without hooks: its output is its input itself."""
    return isinstance(module, nn.Identity) and type(module).forward is nn.Identity.forward and not _hooks(module)


def _accepted_ranks(bn: _BatchNorm) -> List[int]:
    """The input ranks the BatchNorm's input check lets through."""
    ranks = []
    for rank in range(1, 8):
        try:
            bn._check_input_dim(torch.empty((1,) * rank, device="meta"))
        except Exception:  # any error says no
            continue
        ranks.append(rank)
    if _bn_kind(bn) == "norm_act":
        ranks = [r for r in ranks if r == 4]
    return ranks


def _acon_base(act: _Acon) -> Optional[type]:
    return next((c for c in type(act).__mro__ if c in _FUSABLE_ACON), None)


# --- Finding the pairs ---------------------------------------------------------


class _Pair:
    """A BatchNorm and the ACON module that reads its output (`own`: the act
    of a timm BatchNormAct2d), with the reasons it cannot be fused."""

    def __init__(self, bn: _BatchNorm, act: _Acon, own: bool):
        self.bn = bn
        self.act = act
        self.own = own
        self.reasons: List[str] = []


class _Analysis:
    """What calls what in the model, from its graphs and, with an example,
    from one run; and which pairs may be fused."""

    def __init__(self, model: nn.Module, example: Optional[tuple]):
        self.model = model
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.order = {id(m): i for i, m in enumerate(model.modules())}
        # Tracing runs each forward's Python: what it stores on a module
        # (`self.feature = y`, a call counter) is undone afterwards, and a
        # block that stores anything is not trusted to its graph, which
        # does not show the store.
        before = _attributes(model)
        self.traced = _TracedModel(model, (_BatchNorm,))  # BatchNorms (timm's BatchNormAct2d too) are leaves
        # A forward that reads self.training traces differently in the other
        # mode: both graphs count.
        self.graphs: List[Tuple[nn.Module, fx.Graph]] = []
        self.modes: Dict[int, str] = {}  # id(graph) -> its mode, for blocks with a graph per mode
        others: Dict[int, Optional[fx.Graph]] = {}
        for block_id, graph in list(self.traced.graphs.items()):
            block = self.traced.block_of(block_id)
            other, error = _graph_in_other_mode(block, graph)
            if error is None:
                # Grad mode, autocast, checkpointing: a graph drops them, and
                # with them which tensors carry gradients.
                dropped = _state_the_graph_drops(block)
                if dropped:
                    error = f"its forward uses {', '.join(dropped)}, which its graph does not hold"
            else:
                error = f"{error} (in {'eval' if block.training else 'train'} mode)"
            if error is not None:
                self.traced.untraced[block_id] = error
                del self.traced.graphs[block_id]
                continue
            others[block_id] = other
        for changed, names in _restore_attributes(before):
            if id(changed) in self.traced.graphs:
                self.traced.untraced[id(changed)] = f"its forward stores on the module ({', '.join(names)})"
                del self.traced.graphs[id(changed)]
        for block_id, graph in self.traced.graphs.items():
            block = self.traced.block_of(block_id)
            other = others[block_id]
            self.graphs.append((block, graph))
            if other is not None:
                self.graphs.append((block, other))
                self.modes[id(graph)] = "train" if block.training else "eval"
                self.modes[id(other)] = "eval" if block.training else "train"
        self.sites: Dict[int, List[Tuple[nn.Module, fx.Node]]] = defaultdict(list)  # id(module) -> its calls
        for block, graph in self.graphs:
            for node in graph.nodes:
                module = self._called(block, node)
                if isinstance(module, (_BatchNorm, _Acon)):
                    self.sites[id(module)].append((block, node))
        # BatchNorm and ACON modules of untraceable blocks that no graph calls.
        self.orphans = {}
        for orphan in _find_orphans(model, self.traced, (_BatchNorm, _Acon), []):
            if id(orphan.module) not in self.sites:
                self.orphans.setdefault(id(orphan.module), orphan)
        # timm BatchNormAct2d modules by the ACON module they apply.
        self.holders: Dict[int, List[nn.Module]] = defaultdict(list)
        for module in model.modules():
            if isinstance(module, _BatchNorm) and _norm_act_base(type(module)) is not None:
                self.holders[id(getattr(module, "act", None))].append(module)
        self.observed = _Observer(model).run(example) if example is not None else None

    # -- Names

    def path(self, module: nn.Module) -> str:
        return self.paths.get(id(module), "?") or "the model"

    def describe_pair(self, pair: _Pair) -> str:
        return f"{self.path(pair.bn)} ({type(pair.bn).__name__}) -> {self.path(pair.act)} ({_unfused_name(pair.act)})"

    def forward_of(self, block: nn.Module) -> str:
        path = self.paths.get(id(block), "?")
        return f"'{path}.forward'" if path else "the model's forward"

    def describe_node(self, block: nn.Module, node: Any) -> str:
        if not isinstance(node, fx.Node):
            return repr(node)
        if node.op == "call_module":
            prefix = self.paths.get(id(block), "")
            return repr(f"{prefix}.{node.target}" if prefix else node.target)
        if node.op in ("call_function", "call_method"):
            return _function_name(node)
        if node.op == "output":
            return f"the output of {self.forward_of(block)}"
        if node.op == "placeholder":
            return f"the input {node.target!r} of {self.forward_of(block)}"
        return f"{node.op} {node.target}"

    def users(self, block: nn.Module, node: fx.Node) -> List[fx.Node]:
        """The nodes that read `node`, looking through nn.Identity modules
        (timm's drop_block and drop_path when off)."""
        users = []
        for user in node.users:
            if _is_identity(self._called(block, user)) and user.args == (node,) and not user.kwargs:
                users += self.users(block, user)
            else:
                users.append(user)
        return users

    def source(self, block: nn.Module, node: Any) -> Any:
        """The node whose value `node` is, looking back through nn.Identity modules."""
        while isinstance(node, fx.Node) and _is_identity(self._called(block, node)) and len(node.args) == 1:
            node = node.args[0]
        return node

    def _called(self, block: nn.Module, node: Any) -> Optional[nn.Module]:
        if isinstance(node, fx.Node) and node.op == "call_module":
            return block.get_submodule(node.target)
        return None

    # -- Candidates

    def candidates(self) -> List[_Pair]:
        """Every BatchNorm -> ACON pair: a BatchNorm whose output an ACON module
        reads (in a graph or in the example's run; directly or through
        nn.Identity modules), a timm BatchNormAct2d with an ACON act, and a
        BatchNorm next to an ACON module in a block that cannot be traced
        (unless the example showed what reads its output)."""
        pairs: Dict[Tuple[int, int, bool], _Pair] = {}

        def add(bn, act, own=False):
            if not isinstance(bn, _FusedBatchNorm):
                pairs.setdefault((id(bn), id(act), own), _Pair(bn, act, own))

        for bn in self.model.modules():
            if not isinstance(bn, _BatchNorm):
                continue
            act = _own_act(bn)
            if act is not None:
                add(bn, act, own=True)
            for block, node in self.sites.get(id(bn), ()):
                for user in self.users(block, node):
                    reader = self._called(block, user)
                    if isinstance(reader, _Acon):
                        add(bn, reader)
            if self.observed is not None:
                for call in self.observed.calls[id(bn)]:
                    for reader in call.readers:
                        if isinstance(reader.module, _Acon):
                            add(bn, reader.module)
        for block_id in self.traced.untraced:
            # Next to each other, or with nn.Identity modules between them.
            children = [m for m in self.traced.block_of(block_id).children() if not _is_identity(m)]
            for bn, act in zip(children, children[1:]):
                if isinstance(bn, _BatchNorm) and isinstance(act, _Acon) and id(bn) in self.orphans:
                    if self.observed is None or not self.observed.calls[id(bn)]:
                        add(bn, act)
        return sorted(pairs.values(), key=lambda p: (self.order.get(id(p.bn), 0), self.order.get(id(p.act), 0)))

    # -- Decisions

    def decide(self) -> Tuple[List[_Pair], List[_Pair]]:
        """(pairs to fuse, pairs left with their reasons)."""
        pairs = self.candidates()
        own_fused: Set[int] = set()
        for pair in pairs:
            if pair.own:
                pair.reasons = self.bn_problems(pair.bn, own=True) + self.act_problems(pair.act, pair.bn)
                if not pair.reasons:
                    own_fused.add(id(pair.bn))
        ok: Dict[int, _Pair] = {}
        for pair in pairs:
            if not pair.own:
                pair.reasons = (
                    self.bn_problems(pair.bn, own=False)
                    + self.act_problems(pair.act, pair.bn)
                    + self.dataflow_problems(pair.bn, pair.act)
                )
                if not pair.reasons:
                    if id(pair.bn) in ok:  # cannot happen (its output has one reader), but never twice
                        pair.reasons.append("the BatchNorm's output goes to two ACON modules")
                        ok.pop(id(pair.bn)).reasons.append("the BatchNorm's output goes to two ACON modules")
                    else:
                        ok[id(pair.bn)] = pair
        # An ACON module becomes the identity: every call of it must take a
        # fused BatchNorm's output. Leaving one pair can leave others.
        changed = True
        while changed:
            changed = False
            by_act: Dict[int, List[_Pair]] = defaultdict(list)
            for pair in ok.values():
                by_act[id(pair.act)].append(pair)
            for group in by_act.values():
                problems = self.call_problems(group[0].act, ok, own_fused)
                if problems:
                    for pair in group:
                        pair.reasons += problems
                        del ok[id(pair.bn)]
                    changed = True
        fused = [p for p in pairs if not p.reasons]
        return fused, [p for p in pairs if p.reasons]

    def bn_problems(self, bn: _BatchNorm, own: bool) -> List[str]:
        if isinstance(bn, nn.SyncBatchNorm):
            return ["SyncBatchNorm is not fused (its forward synchronises batch statistics across processes)"]
        problems = []
        if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
            problems.append("the BatchNorm is lazy and not initialised yet: " + _RUN_FIRST)
        kind = _bn_kind(bn)
        if kind is None:
            problems.append(
                f"{type(bn).__name__} overrides forward (fused are nn.BatchNorm1d/2d/3d, their subclasses that "
                "keep its forward, and timm's BatchNormAct2d)"
            )
        elif kind == "norm_act":
            drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
            if not isinstance(drop, nn.Identity):
                problems.append(f"its drop ({type(drop).__name__}) is not an nn.Identity")
            elif _hooks(drop):
                problems.append(f"its drop has {_hooks(drop)}")
            if not own:
                if not isinstance(act, nn.Identity):
                    problems.append(f"it applies its own act ({type(act).__name__}) first")
                elif _hooks(act):
                    problems.append(f"its act has {_hooks(act)}")
        if _hooks(bn):
            problems.append(f"the BatchNorm has {_hooks(bn)}")
        return problems

    def act_problems(self, act: _Acon, bn: _BatchNorm) -> List[str]:
        if isinstance(act, _FusedAcon):
            into = ", ".join(repr(p) for p in act._fused_into)
            return [
                f"the ACON module is already fused into {into} and returns its input, so this BatchNorm's output "
                "is not activated: a module changed after fuse_batchnorm"
            ]
        base = _acon_base(act)
        if base is None:
            return [f"{type(act).__name__} is not an AconA, AconB, AconC or MetaAconC"]
        problems = []
        # MetaAconC's parameters are its own (its beta comes from its generator).
        same_parameters = base is MetaAconC or type(act).acon_c_parameters is base.acon_c_parameters
        if type(act).forward is not base.forward or not same_parameters:
            problems.append(f"{type(act).__name__} overrides forward or acon_c_parameters")
        if act.width is None:
            problems.append("the ACON module is lazy (its width is not known yet): " + _RUN_FIRST)
        elif act.width != bn.num_features:
            problems.append(f"the BatchNorm has {bn.num_features} channels, the ACON module {act.width}")
        if act.impl != "fused":
            problems.append(f"the ACON module has impl={act.impl!r}")
        if _hooks(act):
            problems.append(f"the ACON module has {_hooks(act)}")
        problems += self.axis_problems(act, bn)
        return problems

    def axis_problems(self, act: _Acon, bn: _BatchNorm) -> List[str]:
        """The ACON's axis must be the BatchNorm's channel axis 1 for every
        rank the BatchNorm gets (seen in the example's run), or takes."""
        seen = sorted({c.rank for c in self.observed.calls[id(bn)] if c.rank}) if self.observed else []
        ranks = seen or _accepted_ranks(bn)
        if not ranks:
            return ["cannot tell the rank of the BatchNorm's input (its _check_input_dim takes none)"]
        cd = act.channel_dim
        wrong = [r for r in ranks if not (-r <= cd < r and cd % r == 1)]
        if not wrong:
            return []
        shapes = " or ".join(f"{r}-D" for r in wrong)
        note = f"the ACON module's channel_dim={cd} is not the BatchNorm's channel axis 1 for {shapes} input"
        if not seen and len(wrong) < len(ranks):
            takes = " and ".join(f"{r}-D" for r in ranks)
            note += f" ({type(bn).__name__} takes {takes} input; example_input= shows which this model gives it)"
        return [note]

    def dataflow_problems(self, bn: _BatchNorm, act: _Acon) -> List[str]:
        """Whether the BatchNorm's output goes to `act` and nowhere else. A
        run of example_input shows one path through a forward, not the
        branches it did not take: it can veto a pair, never allow one."""
        problems = self.holder_problems(bn, act)
        if problems:
            return problems
        if id(bn) not in self.sites:
            return ["no traced forward calls the BatchNorm, so what reads its output is not known"]
        return self.graph_problems(bn, act) or _unique(self.run_problems(bn, act))

    def holder_problems(self, *modules: nn.Module) -> List[str]:
        """A block that cannot be traced and holds one of `modules` (at any
        depth) may call it directly: those calls are not known."""
        problems = []
        for block_id, why in self.traced.untraced.items():
            block = self.traced.block_of(block_id)
            if _is_torch_nn_builtin(block):
                continue
            held = [m for m in modules if m is not block and any(m is d for d in block.modules())]
            if held:
                names = " and ".join(f"'{self.path(m)}'" for m in held)
                problems.append(f"torch.fx cannot trace {self.traced.describe(block)} ({why}), which holds {names}")
        return problems

    def graph_problems(self, bn: _BatchNorm, act: _Acon) -> List[str]:
        sites = self.sites[id(bn)]
        blocks = list({id(block): block for block, _ in sites}.values())
        if len(blocks) > 1:
            names = ", ".join(self.forward_of(b) for b in blocks)
            return [f"the BatchNorm is called in {len(blocks)} forwards ({names})"]
        per_graph = Counter(id(node.graph) for _, node in sites)
        for block, node in sites:
            if per_graph[id(node.graph)] > 1:
                places = f"{per_graph[id(node.graph)]} places in {self.forward_of(block)}"
                return [f"the BatchNorm is called at {places}{self.mode_of(node)}"]
        problems = []
        for block, node in sites:
            users = self.users(block, node)
            readers = [u for u in users if self._called(block, u) is act]
            others = ", ".join(self.describe_node(block, u) for u in users if self._called(block, u) is not act)
            if not readers:
                problems.append(
                    f"in {self.forward_of(block)}{self.mode_of(node)} its output goes to {others or 'nothing'}, "
                    "not to the ACON module"
                )
            elif others:
                problems.append(f"the BatchNorm's output is also read by {others}{self.mode_of(node)}")
            if any(len(reader.args) != 1 or reader.kwargs for reader in readers):
                problems.append("the ACON module is called with more arguments than the BatchNorm's output")
        return problems

    def mode_of(self, node: fx.Node) -> str:
        """ " (in train mode)" for a node of a forward that traces differently
        in train and eval mode, else ""."""
        mode = self.modes.get(id(node.graph))
        return f" (in {mode} mode)" if mode else ""

    def run_problems(self, bn: _BatchNorm, act: _Acon) -> List[str]:
        """What the example's run says: each call's output read by `act` once,
        and by nothing else."""
        calls = self.observed.calls[id(bn)] if self.observed else []
        if not calls:
            return []
        problems = []
        for call in calls:
            others = [r.what for r in call.readers if r.module is not act]
            count = sum(r.module is act for r in call.readers)
            if count == 0:
                problems.append(
                    f"on example_input its output went to {', '.join(others) or 'nothing'}, not to the ACON module"
                )
            elif others:
                problems.append(
                    f"the BatchNorm's output is also read by {', '.join(_unique(others))} (on example_input)"
                )
            if count > 1:
                problems.append(f"the ACON module read the BatchNorm's output {count} times (on example_input)")
        return problems

    @staticmethod
    def applies_own_act(module: Any, own_fused: Set[int]) -> bool:
        """Whether `module` is a timm BatchNormAct2d that applies its act's
        parameters itself (fused now or by an earlier call), not calling it."""
        if isinstance(module, _FusedBatchNorm):
            return module._fused_acon is None
        return id(module) in own_fused

    def call_problems(self, act: _Acon, ok: Dict[int, _Pair], own_fused: Set[int]) -> List[str]:
        """Why `act` cannot return its input: a call of it that does not take
        the output of a BatchNorm fused with it."""

        def fused_with_act(module):
            pair = ok.get(id(module))
            return pair is not None and pair.act is act

        problems = []
        known = False
        for block, node in self.sites.get(id(act), ()):
            known = True
            source = self.source(block, node.args[0]) if node.args else None
            module = self._called(block, source)
            if isinstance(module, _BatchNorm) and fused_with_act(module):
                continue
            if isinstance(module, _BatchNorm):
                problems.append(f"the ACON module is also applied after '{self.path(module)}', which is not fused")
            else:
                what = self.describe_node(block, source)
                problems.append(f"the ACON module is also called on {what} in {self.forward_of(block)}")
        if id(act) in self.orphans:
            known = True
            parent = self.orphans[id(act)].parent
            problems.append(f"torch.fx cannot trace {self.traced.describe(parent)}, which calls the ACON module")
        for holder in self.holders.get(id(act), []):
            known = True
            if not self.applies_own_act(holder, own_fused):
                problems.append(f"the ACON module is also the act of '{self.path(holder)}', which is not fused")
        if self.observed is not None and not problems:  # the run can only veto what the graphs allow
            for call in self.observed.calls[id(act)]:
                source = call.source.module if call.source is not None else None
                if source is not None and fused_with_act(source):
                    continue
                if self.applies_own_act(call.parent, own_fused) and getattr(call.parent, "act", None) is act:
                    continue
                if source is not None:
                    problems.append(f"the ACON module is also applied after '{self.path(source)}', which is not fused")
                else:
                    where = f" in '{self.path(call.parent)}'" if call.parent is not None else ""
                    problems.append(
                        f"on example_input the ACON module is also called{where} on a tensor no BatchNorm returned"
                    )
        if not known:
            problems.append("no traced forward calls the ACON module, so its other calls are not known")
        return _unique(problems)


# A module's own dicts of parameters, buffers and children: what its
# __dict__ holds besides its plain attributes.
_MODULE_DICTS = ("_parameters", "_buffers", "_modules")


def _attributes(model: nn.Module) -> Dict[nn.Module, Dict[str, Any]]:
    """Each module's plain attributes (its __dict__ less parameters, buffers
    and children), by module."""
    return {m: {k: v for k, v in m.__dict__.items() if k not in _MODULE_DICTS} for m in model.modules()}


def _restore_attributes(before: Dict[nn.Module, Dict[str, Any]]) -> List[Tuple[nn.Module, List[str]]]:
    """Puts each module's plain attributes back as `before` holds them; returns
    the modules whose attributes had changed, with the names."""
    changed = []
    for module, attributes in before.items():
        now = {k: v for k, v in module.__dict__.items() if k not in _MODULE_DICTS}
        names = sorted(k for k in attributes.keys() | now.keys() if k not in now or now[k] is not attributes.get(k))
        if names:
            for name in now.keys() - attributes.keys():
                del module.__dict__[name]
            module.__dict__.update(attributes)
            changed.append((module, names))
    return changed


def _graph_in_other_mode(block: nn.Module, graph: fx.Graph) -> Tuple[Optional[fx.Graph], Optional[str]]:
    """(the block's graph traced in the other train/eval mode if it differs,
    else None; the error if it cannot be traced in that mode)."""
    # Every module below the block flips too: a forward may read a child's
    # mode (`if self.bn.training:`).
    modes = [(module, module.training) for module in block.modules()]
    try:
        block.train(not block.training)
        other = _OneLevelTracer().trace(block)
    except Exception as error:  # fx raises many kinds on untraceable code
        return None, f"{type(error).__name__}: {error}".splitlines()[0]
    finally:
        for module, mode in modes:
            module.training = mode
    same = other.python_code("self").src == graph.python_code("self").src
    return (None if same else other), None


def _unique(items: Sequence[str]) -> List[str]:
    return list(dict.fromkeys(items))


def _unfused_name(module: nn.Module) -> str:
    return getattr(type(module), "_unfused_class", type(module)).__name__


# --- Running the example -------------------------------------------------------


class _Reader(NamedTuple):
    what: str  # for messages
    module: Optional[nn.Module]  # the module called on the tensor, None for an op


class _Call:
    """One call of a BatchNorm or ACON module in the example's run."""

    def __init__(self, module: nn.Module, parent: Optional[nn.Module]):
        self.module = module
        self.parent = parent  # the module whose forward called it
        self.rank: Optional[int] = None  # of its input
        self.source: Optional["_Call"] = None  # the BatchNorm call whose output is its input
        self.readers: List[_Reader] = []  # a BatchNorm call's: what read its output


# Ops that read a tensor's metadata only: they see the same value fused.
_METADATA = {
    "size", "dim", "shape", "ndim", "numel", "stride", "dtype", "device", "layout", "is_contiguous",
    "is_floating_point", "is_cuda", "requires_grad", "grad_fn", "element_size", "get_device", "storage_offset",
}  # fmt: skip
# Python operators that write into their first operand (x += y, x[i] = y).
_WRITING_DUNDER = re.compile(r"^__(i(add|sub|mul|truediv|floordiv|mod|pow|and|or|xor|lshift|rshift|matmul)|setitem)__$")


class _Observer(TorchFunctionMode):
    """Records, in one run of the model, every call of its BatchNorm and ACON
    modules, and what reads each BatchNorm call's output: an op (a torch
    function, seen by this mode), a module without children, or a BatchNorm
    or ACON module called on it (what runs inside those is theirs). Module
    calls are seen by global forward hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.calls: Dict[int, List[_Call]] = defaultdict(list)  # id(module) -> its calls
        self.outputs: Dict[int, Tuple[Tensor, _Call]] = {}  # id(tensor) -> (it, the BatchNorm call it came from)
        self.stack: List[Tuple[nn.Module, Set[int], Optional[_Call]]] = []  # running modules, what they took
        self.busy = False  # in a hook of this class: its own tensor calls are not reads

    def run(self, example: tuple) -> "_Observer":
        saved = [(b, b.detach().clone()) for b in self.model.buffers() if not isinstance(b, UninitializedBuffer)]
        handles = [register_module_forward_pre_hook(self._pre_hook), register_module_forward_hook(self._hook)]
        try:
            with self:
                _dry_run(self.model, example)
        except Exception as error:
            raise ValueError(
                f"fuse_batchnorm: the model cannot run example_input: {type(error).__name__}: {error}"
            ) from error
        finally:
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for buffer, value in saved:
                    if buffer.shape == value.shape:
                        buffer.copy_(value)
            self.outputs.clear()
        return self

    def _source(self, t: Any) -> Optional[_Call]:
        """The BatchNorm call that returned `t`, unless a running BatchNorm or
        ACON module took it (what happens to it inside is theirs)."""
        if not isinstance(t, Tensor):
            return None
        entry = self.outputs.get(id(t))
        if entry is None or entry[0] is not t:
            return None
        if any(id(t) in taken for _, taken, _ in self.stack):
            return None
        return entry[1]

    def _where(self) -> str:
        return f" (in '{self.paths.get(id(self.stack[-1][0]), '?')}')" if self.stack else ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.busy and self.outputs:
            self.busy = True
            try:
                name = getattr(func, "__name__", str(func))
                if name == "__get__":  # a property: Tensor.shape, .T, .data, ...
                    name = getattr(getattr(func, "__self__", None), "__name__", name)
                raw, name = name, name.strip("_") or name
                if name not in _METADATA:
                    for t in tree_leaves((args, kwargs)):
                        source = self._source(t)
                        if source is not None:
                            source.readers.append(_Reader(name + self._where(), None))
                    # An op that writes a BatchNorm's output: what reads it later
                    # does not read the BatchNorm's output.
                    inplace = raw.endswith("_") and not raw.endswith("__") or _WRITING_DUNDER.match(raw)
                    written = [args[0] if args else None] if inplace or kwargs.get("inplace") else []
                    for t in written + tree_leaves(kwargs.get("out")):
                        if self._source(t) is not None:
                            del self.outputs[id(t)]
            finally:
                self.busy = False
        return func(*args, **kwargs)

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self.busy:
            return
        self.busy = True
        try:
            parent = self.stack[-1][0] if self.stack else None
            call = None
            if isinstance(module, (_BatchNorm, _Acon)):
                call = _Call(module, parent)
                self.calls[id(module)].append(call)
                if args and isinstance(args[0], Tensor):
                    call.rank = args[0].dim()
                    call.source = self._source(args[0])
            taken: Set[int] = set()
            if call is None and _is_identity(module):
                pass  # returns its input: what reads its output reads the input
            elif call is not None or next(module.children(), None) is None:
                # A module that computes on its own: its reads are its inputs.
                for t in tree_leaves(args):
                    source = self._source(t)
                    if source is not None and id(t) not in taken:
                        source.readers.append(_Reader(f"'{self.paths.get(id(module), '?')}'", module))
                        taken.add(id(t))
            self.stack.append((module, taken, call))
        finally:
            self.busy = False

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.busy:
            return
        self.busy = True
        try:
            _, _, call = self.stack.pop()
            if isinstance(module, _BatchNorm) and isinstance(output, Tensor) and call is not None:
                self.outputs[id(output)] = (output, call)
            if module is self.model:
                for t in tree_leaves(output):
                    source = self._source(t)
                    if source is not None:
                        source.readers.append(_Reader("the model's output", None))
        finally:
            self.busy = False


# --- Fusing --------------------------------------------------------------------


def _fuse(pair: _Pair, analysis: _Analysis) -> None:
    bn, act = pair.bn, pair.act
    mixin = _FusedBatchNormAct if _bn_kind(bn) == "norm_act" else _FusedBatchNorm
    bn.__class__ = _fused_class(type(bn), mixin)
    # Plain attributes, not submodules: no state_dict key.
    object.__setattr__(bn, "_fused_acon", None if pair.own else act)
    object.__setattr__(bn, "_fused_acon_path", analysis.path(act))
    if pair.own:
        return
    if not isinstance(act, _FusedAcon):
        act.__class__ = _fused_class(type(act), _FusedAcon)
        object.__setattr__(act, "_fused_into", [])
    act._fused_into.append(analysis.path(bn))


def _left_note(left: List[_Pair], analysis: _Analysis) -> str:
    lines = [f"{analysis.describe_pair(p)}: {'; '.join(p.reasons)}" for p in left]
    pairs = "pair is left unfused (it computes" if len(left) == 1 else "pairs are left unfused (they compute"
    return f"fuse_batchnorm: {len(left)} BatchNorm -> ACON {pairs} as before, in two ops):\n  " + "\n  ".join(lines)
