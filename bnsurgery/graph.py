"""The graph walk: who produces and who consumes every tensor around each BN call.

Two ways to build the same :class:`Graph`:

* **runtime** (``example_inputs`` given): run one real forward pass in eval mode under a
  :class:`~torch.overrides.TorchFunctionMode` and global module hooks. Every torch function
  call becomes a :class:`Node`; every BN module call becomes one atomic node. Tensors are
  followed by identity and by their version counter, so in-place ops, aliases mutated through a
  view, a module called several times, functional convs (``F.conv2d``), residuals, dict/tuple
  inputs and outputs and data-dependent control flow are all seen as they really happen.
* **symbolic** (no ``example_inputs``): ``torch.fx`` symbolic tracing with every BN module as a
  leaf. Works without data, fails on models with data-dependent control flow (then pass
  ``example_inputs``). Tensor ranks are unknown on this path.

Nothing here relies on module registration order, and nothing here changes the model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from .errors import TraceError, UnsupportedModelError
from .hooks import call_input, user_hooks_suspended
from .norms import is_batchnorm
from .tree import as_args, eval_mode
from .verify import tensors_in

__all__ = [
    "Graph",
    "Node",
    "Trace",
    "Value",
    "AVG_POOL_ARGS",
    "CONCATS",
    "DECISIONS",
    "PERMUTES",
    "POOLS",
    "RESHAPES",
    "fx_trace",
    "trace",
]

#: torch functions with a weight that a BN can be folded into: kind, argument names.
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "output_padding",
    "groups",
    "dilation",
)
_LINEAR_OPS: dict[Any, tuple[str, tuple[str, ...]]] = {
    torch.conv1d: ("conv", _CONV_ARGS),
    torch.conv2d: ("conv", _CONV_ARGS),
    torch.conv3d: ("conv", _CONV_ARGS),
    torch.conv_transpose1d: ("conv_transpose", _CONVT_ARGS),
    torch.conv_transpose2d: ("conv_transpose", _CONVT_ARGS),
    torch.conv_transpose3d: ("conv_transpose", _CONVT_ARGS),
    F.linear: ("linear", ("input", "weight", "bias")),
}
_BATCH_NORM_ARGS = (
    "input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"
)  # fmt: skip
_DEFAULTS = {
    "bias": None,
    "stride": 1,
    "padding": 0,
    "dilation": 1,
    "groups": 1,
    "output_padding": 0,
}

#: Calls that turn a tensor's values into a Python value, on which Python code can branch
#: (``if x.mean() > 0:``): the walk sees one side of such a branch only, so a tensor made
#: before one and consumed after it may have other consumers on inputs that go the other way.
#: Matched by function name in the runtime walk's TorchFunctionMode, so only calls that return
#: Python (or NumPy) values from data belong here: ``torch.equal``/``allclose``/``is_nonzero``
#: and their Tensor methods, ``v in x``, ``.numpy()``; not ``any``/``all`` (a tensor, counted at
#: its ``__bool__``).
DECISIONS = frozenset(
    {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "__complex__"}
    | {"equal", "allclose", "is_nonzero", "__contains__", "numpy", "__array__"}
)

#: Calls that read only a tensor's metadata, never its values: not consumers.
_METADATA = frozenset(
    {
        "size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous",
        "element_size", "is_floating_point", "is_complex", "get_device", "__len__",
        "storage_offset", "data_ptr", "is_pinned", "__get__", "__hash__", "has_names",
        "is_nonzero_size",
    }
)  # fmt: skip
#: Calls that read only the shape, dtype or device of the tensor at these argument positions
#: (``y.reshape_as(x)`` reads ``x``'s shape, ``torch.zeros_like(x)`` its shape and dtype):
#: such a tensor is not consumed, so a layer whose output is also read this way still folds.
_SHAPE_ONLY = {
    **dict.fromkeys(("reshape_as", "view_as", "expand_as", "type_as"), (1,)),
    **dict.fromkeys(
        (
            "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
            "new_zeros", "new_ones", "new_empty", "new_full",
        ),
        (0,),
    ),
}  # fmt: skip
#: Tensor attributes that are metadata (``z.shape``): fx records them as ``getattr`` nodes.
_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "layout", "is_cuda"})


@dataclass(eq=False)
class Value:
    """One tensor value in the walked graph (a tensor object between two mutations)."""

    index: int
    producer: Node | None
    origin: str = "op"
    consumers: list[Node] = field(default_factory=list)
    is_output: bool = False
    ndim: int | None = None
    #: the tensor's shape (runtime walk only)
    shape: tuple[int, ...] | None = None
    #: data-dependent decisions (:data:`DECISIONS`) the forward pass had made when it was made
    decisions: int = 0

    def __repr__(self) -> str:
        prod = self.producer.name if self.producer else self.origin
        return f"Value(%{self.index} from {prod}, {len(self.consumers)} consumers)"


@dataclass(eq=False)
class Node:
    """One call: a torch function, or a whole BN module call (``kind == "batchnorm"``).

    For ``conv``, ``conv_transpose`` and ``linear`` nodes, ``data`` is the input being
    transformed and ``weight``/``bias`` are the very tensor objects the call used, so identity
    with a module's parameter tells whether folding into that parameter is exact.
    """

    index: int
    kind: str
    name: str
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    module: nn.Module | None = None
    data: Value | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    #: data-dependent decisions (:data:`DECISIONS`) the forward pass had made when it was called
    decisions: int = 0
    #: the weight as a value, where the forward pass computed it (weight norm's ``g * v /
    #: |v|``): its producer says how (runtime walk)
    weight_value: Value | None = None

    def __repr__(self) -> str:
        return f"Node(#{self.index} {self.kind} {self.name})"


@dataclass
class Graph:
    """Producers and consumers of every tensor in one forward pass."""

    method: str
    nodes: list[Node]
    values: list[Value]
    state_uses: dict[int, list[Node]]

    def bn_sites(self, module: nn.Module) -> list[Node]:
        """The calls of one BN module, in the order they ran."""
        return [n for n in self.nodes if n.kind == "batchnorm" and n.module is module]

    def uses(self, tensor: torch.Tensor | None) -> list[Node]:
        """Every node that used this parameter or buffer, in any argument position."""
        if tensor is None:
            return []
        return self.state_uses.get(id(tensor), [])


@dataclass
class Trace:
    """A walked graph plus, on the runtime path, the model's output on the example inputs."""

    graph: Graph
    output: Any = None


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    feed: Callable[[nn.Module, Any], Any] | None = None,
) -> Trace:
    """Walk the model: a real forward pass if ``example_inputs`` is given, else symbolically.

    Args:
        model: the model; it is run in eval mode without gradients and left as it was.
        example_inputs: a tensor, or a tuple of positional inputs (dicts allowed inside); with
            ``feed``, a batch as the data gives it.
        feed: ``feed(model, example_inputs)`` runs the model (a pass's ``forward``), instead
            of ``model(*example_inputs)``; every tensor of the batch is a model input.

    Returns:
        A :class:`Trace`.

    Raises:
        TraceError: the forward pass failed, or symbolic tracing failed without inputs.
        UnsupportedModelError: the model is a TorchScript module.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            "TorchScript modules cannot be walked; load the eager model (--arch with a state dict)"
        )
    if example_inputs is None:
        return Trace(_symbolic(model))
    if feed is not None:
        return _runtime(model, (example_inputs,), lambda batch: feed(model, batch))
    return _runtime(model, as_args(example_inputs))


# --------------------------------------------------------------------------- runtime walk


def _state_ids(model: nn.Module) -> set[int]:
    ids = {id(p) for _, p in model.named_parameters(remove_duplicate=False)}
    ids |= {id(b) for _, b in model.named_buffers(remove_duplicate=False)}
    return ids


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except Exception:  # sparse, nested or inference tensors carry no version counter
        return -1


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    if name == "__get__" and owner is not None:
        return f"{getattr(owner, '__name__', '')}.__get__"
    return name


#: Ops that rearrange a tensor without computing, in two kinds: those that keep the order of
#: its elements (``RESHAPES``) and those that swap axes (``PERMUTES``). Their arguments are
#: recorded (``attrs["args"]``, ``attrs["kwargs"]``) when they can be replayed.
RESHAPES = frozenset(
    {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "clone"}
)
PERMUTES = frozenset({"transpose", "swapaxes", "swapdims", "permute"})
_LAYOUT_OPS = RESHAPES | PERMUTES
#: Ops that average or take the maximum over spatial windows, per channel, and ``mean`` over
#: axes: a BN's affine map commutes with an average over real values and, where its scale is
#: positive, with a maximum. Recorded with their arguments like the layout ops.
POOLS = frozenset(
    {
        f"{kind}_pool{d}d"
        for kind in ("avg", "max", "adaptive_avg", "adaptive_max")
        for d in (1, 2, 3)
    }
    | {"mean"}
)
#: The arguments of average pooling after its input, in ``F.avg_pool2d``'s order.
AVG_POOL_ARGS = (
    "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override",
)  # fmt: skip
#: Ops that join tensors along an axis, recorded with it (``attrs["dim"]``): a BN after one
#: folds slice by slice into the layers that produce the pieces.
CONCATS = frozenset({"cat", "concat", "concatenate"})


def _concat_dim(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"dim": d}`` for ``torch.cat(tensors, d)`` when ``d`` is a plain int, else ``{}``."""
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    return {"dim": dim} if isinstance(dim, int) and not isinstance(dim, bool) else {}


def _plain(value: Any, flags: bool = False) -> bool:
    """Ints, None and tuples or lists of them, nested (and bools, with ``flags``): arguments
    that can be replayed."""
    if isinstance(value, tuple | list):
        return all(_plain(v, flags) for v in value)
    if isinstance(value, dict):
        return all(_plain(v, flags) for v in value.values())
    if isinstance(value, bool):
        return flags
    return value is None or isinstance(value, int)


def _shape_only(name: str, args: tuple, tensors: list[torch.Tensor]) -> set[int]:
    """Ids of the tensors a call reads only the shape, dtype or device of (:data:`_SHAPE_ONLY`)
    and does not also take as data in another argument."""
    positions = _SHAPE_ONLY.get(name)
    if positions is None:  # nearly every call: nothing to work out
        return set()
    meta = [id(args[i]) for i in positions if i < len(args) and isinstance(args[i], torch.Tensor)]
    seen = [id(t) for t in tensors]
    return {m for m in meta if seen.count(m) == meta.count(m)}  # x.reshape_as(x) reads x


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(_DEFAULTS)
    bound.update(zip(names, args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    return bound


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.state = _state_ids(model)
        self.bn = {id(m) for m in model.modules() if is_batchnorm(m)}
        self.nodes: list[Node] = []
        self.values: list[Value] = []
        self.state_uses: dict[int, list[Node]] = defaultdict(list)
        # tensor -> (value, version), held weakly: an intermediate is freed as soon as the
        # forward pass is done with it (a strong list made fold hold every activation), and a
        # freed tensor's entry goes with it, so a reused id is never taken for it
        self.bound: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.quiet = 0  # > 0 inside a BN module call or inside the recorder's own work
        self.decisions = 0  # data-dependent decisions so far (DECISIONS)
        self.bn_stack: list[tuple[nn.Module, Value | None]] = []

    # values ---------------------------------------------------------------------------
    def _new_value(self, t: torch.Tensor, producer: Node | None, origin: str) -> Value:
        v = Value(
            len(self.values), producer, origin, ndim=t.dim(), shape=tuple(t.shape),
            decisions=self.decisions,
        )  # fmt: skip
        self.values.append(v)
        self.bound[t] = (v, _version(t))
        return v

    def value_of(self, t: torch.Tensor) -> Value:
        entry = self.bound.get(t)
        if entry is None:
            return self._new_value(t, None, "input or constant")
        value, version = entry
        if version != _version(t):  # changed through an alias we did not see written
            return self._new_value(t, None, "mutated in place through a view or alias")
        return value

    def _node(self, kind: str, name: str, **kw: Any) -> Node:
        node = Node(len(self.nodes), kind, name, decisions=self.decisions, **kw)
        self.nodes.append(node)
        return node

    # torch functions ------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if self.quiet:
            return func(*args, **kwargs)
        name = _func_name(func)
        if name in DECISIONS and not (args and id(args[0]) in self.state):
            self.decisions += 1  # a value read into Python (a parameter's is no data)
        self.quiet += 1
        try:
            leaves, _ = tree_flatten((args, kwargs))
            tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
            before = [_version(t) for t in tensors]
            meta = _shape_only(name, args, tensors)
            ins = [
                self.value_of(t) for t in tensors if id(t) not in self.state and id(t) not in meta
            ]
        finally:
            self.quiet -= 1
        out = func(*args, **kwargs)
        self.quiet += 1
        try:
            self._record(func, args, kwargs, tensors, before, ins, out)
        finally:
            self.quiet -= 1
        return out

    def _record(self, func, args, kwargs, tensors, before, ins, out) -> None:
        name = _func_name(func)
        out_leaves, _ = tree_flatten(out)
        outs = [t for t in out_leaves if isinstance(t, torch.Tensor)]
        mutated = [t for t, v in zip(tensors, before, strict=True) if _version(t) != v]
        in_ids = {id(t) for t in tensors}
        if not mutated and outs and all(id(t) in in_ids for t in outs):
            return  # returned its own input unchanged (contiguous(), .to(same dtype), ...)
        if not outs and not mutated and name.split(".")[-1] in _METADATA:
            return  # read metadata only
        kind, names = _LINEAR_OPS.get(func, ("op", ()))
        node = self._node(kind, name, inputs=ins)
        if names:
            bound = _bind(names, args, kwargs)
            data = bound.get("input")
            node.data = self.value_of(data) if isinstance(data, torch.Tensor) else None
            node.weight, node.bias = bound.get("weight"), bound.get("bias")
            node.attrs = {k: bound[k] for k in names[3:] if k in bound}
            if isinstance(node.weight, torch.Tensor) and id(node.weight) not in self.state:
                node.weight_value = self.value_of(node.weight)
        if func is F.batch_norm:  # a BN written as a call (a BN module's own is not seen)
            bound = dict(zip(_BATCH_NORM_ARGS, args, strict=False))
            bound.update({k: v for k, v in kwargs.items() if k in _BATCH_NORM_ARGS})
            data = bound.get("input")
            node.data = self.value_of(data) if isinstance(data, torch.Tensor) else None
            node.attrs = {"batch_norm": {k: bound.get(k) for k in _BATCH_NORM_ARGS[1:]}}
        if name == "pad":  # F.pad: the mode says whether padded values copy real ones
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            node.attrs = {"mode": mode}
        elif name in CONCATS:
            node.attrs = _concat_dim(args, kwargs)
        elif name == "_weight_norm" and len(args) >= 2:  # torch._weight_norm(v, g, dim)
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            node.attrs = {"v": args[0], "g": args[1], "dim": dim}
        elif name in POOLS and _plain((args[1:], kwargs), flags=True):
            node.attrs = {"args": tuple(args[1:]), "kwargs": tuple(kwargs.items())}
        elif name in _LAYOUT_OPS and _plain((args[1:], kwargs)):
            # how to replay it: fold follows the channel axis through it, and its layer check
            # repeats it on the recomputed layer's output
            node.attrs = {"args": tuple(args[1:]), "kwargs": tuple(kwargs.items())}
        for v in ins:
            v.consumers.append(node)
        for t in tensors:
            if id(t) in self.state:
                self.state_uses[id(t)].append(node)
        for t in mutated:
            if id(t) not in self.state:
                node.outputs.append(self._new_value(t, node, "op"))
        for t in outs:
            if id(t) not in in_ids and id(t) not in self.state:
                node.outputs.append(self._new_value(t, node, "op"))

    # BN module calls (hooks on each BN, with keyword arguments: bn(input=x) is a call too) --
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if id(module) not in self.bn:
            return
        data = None
        x = call_input(args, kwargs)
        if not self.quiet and isinstance(x, torch.Tensor):
            self.quiet += 1
            try:
                data = self.value_of(x)
            finally:
                self.quiet -= 1
        self.bn_stack.append((module, data))
        self.quiet += 1

    def post_hook(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> None:
        if id(module) not in self.bn or not self.bn_stack:
            return
        _, data = self.bn_stack.pop()
        self.quiet -= 1
        if self.quiet:
            return  # a BN inside another BN call is part of that call
        self.quiet += 1
        try:
            node = self._node("batchnorm", "", module=module, data=data)
            if data is not None:
                node.inputs.append(data)
                data.consumers.append(node)
            for t in tree_flatten(output)[0]:
                if isinstance(t, torch.Tensor):
                    node.outputs.append(self._new_value(t, node, "op"))
        finally:
            self.quiet -= 1


def _runtime(
    model: nn.Module, args: tuple[Any, ...], run: Callable[..., Any] | None = None
) -> Trace:
    with user_hooks_suspended(model):  # the walk is not a forward pass the user made
        return _walk(model, args, run or model)


def _walk(model: nn.Module, args: tuple[Any, ...], run: Callable[..., Any]) -> Trace:
    recorder = _Recorder(model)
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    hooks = [
        hook
        for bn in {id(m): m for m in model.modules() if id(m) in recorder.bn}.values()
        for hook in (
            bn.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True),
            bn.register_forward_hook(recorder.post_hook, with_kwargs=True),
        )
    ]
    try:
        with eval_mode(model), torch.no_grad():
            for t in tree_flatten(args)[0]:
                if isinstance(t, torch.Tensor):
                    recorder.value_of(t).origin = "model input"
            with recorder:
                output = run(*args)
    except Exception as exc:
        raise TraceError(
            f"the forward pass on the example inputs failed: {_one_line(exc)}"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
    for t in tensors_in(output):  # dataclass outputs too: their tensors are outputs
        recorder.value_of(t).is_output = True
    for node in recorder.nodes:
        if node.kind == "batchnorm":
            node.name = names.get(id(node.module), type(node.module).__name__)
    graph = Graph("runtime", recorder.nodes, recorder.values, dict(recorder.state_uses))
    return Trace(graph, output)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:400]


# -------------------------------------------------------------------------- symbolic walk


_STATS = ("running_mean", "running_var")


class _Tracer(fx.Tracer):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        stats = [getattr(m, k, None) for m in model.modules() if is_batchnorm(m) for k in _STATS]
        self.stats = {id(t) for t in stats if isinstance(t, torch.Tensor)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batchnorm(m) or super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        # fx makes unproxied buffers constants, so `bn.running_mean.view(...)` left no trace of
        # the statistic; proxy BN statistics (a BN is a leaf: any read seen is outside its call)
        # so the read is a get_attr node and a use, as on the runtime walk. Only statistics: a
        # proxied buffer cannot steer Python code, which other buffers may do.
        self.proxy_buffer_attributes = id(attr_val) in self.stats
        try:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        finally:
            self.proxy_buffer_attributes = False


_MODULE_KINDS: tuple[tuple[type[nn.Module], str, tuple[str, ...]], ...] = (
    (nn.Conv1d, "conv", _CONV_ARGS),
    (nn.Conv2d, "conv", _CONV_ARGS),
    (nn.Conv3d, "conv", _CONV_ARGS),
    (nn.ConvTranspose1d, "conv_transpose", _CONVT_ARGS),
    (nn.ConvTranspose2d, "conv_transpose", _CONVT_ARGS),
    (nn.ConvTranspose3d, "conv_transpose", _CONVT_ARGS),
    (nn.Linear, "linear", ("input", "weight", "bias")),
)


def fx_trace(model: nn.Module) -> tuple[fx.Graph, dict[str, Any]]:
    """``torch.fx`` symbolic tracing as the symbolic walk does it: eval mode, BN modules as
    leaves, without user hooks. Returns the graph and the tensors fx made in ``forward``
    (``_tensor_constant0``, ...), taken off the model again so tracing leaves it as it was.

    Raises:
        TraceError: the module cannot be traced symbolically.
    """
    before = set(vars(model))
    try:
        # eval mode, as the runtime walk and the fold itself: `if not self.training` branches
        # are the function a fold must keep (eval_mode restores every module's own flag); and
        # no user hooks, as there: fx runs those of non-leaf modules, on proxies
        with eval_mode(model), user_hooks_suspended(model):
            fx_graph = _Tracer(model).trace(model)
    except Exception as exc:
        raise TraceError(
            f"symbolic tracing failed ({_one_line(exc)}); pass example_inputs to walk a real "
            "forward pass instead"
        ) from exc
    finally:
        added = {k: vars(model).pop(k) for k in set(vars(model)) - before}
    return fx_graph, added


def _symbolic(model: nn.Module) -> Graph:
    fx_graph, added = fx_trace(model)
    nodes: list[Node] = []
    values: list[Value] = []
    state_uses: dict[int, list[Node]] = defaultdict(list)
    value_of: dict[fx.Node, Value] = {}
    tensor_of: dict[fx.Node, torch.Tensor] = {}

    def resolve(target: str) -> Any:
        if target in added:
            return added[target]
        obj: Any = model
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    for fnode in fx_graph.nodes:
        if fnode.op == "placeholder":
            v = Value(len(values), None, "model input")
            values.append(v)
            value_of[fnode] = v
            continue
        if fnode.op == "get_attr":
            obj = resolve(fnode.target)
            if isinstance(obj, torch.Tensor):
                tensor_of[fnode] = obj
            continue
        if fnode.op == "output":
            for arg in _fx_inputs(fnode):
                if arg in value_of:
                    value_of[arg].is_output = True
            continue
        if _is_metadata(fnode):
            continue  # z.shape, z.size(): no consumer, as on the runtime walk (_METADATA)
        node = Node(len(nodes), "op", str(getattr(fnode.target, "__name__", fnode.target)))
        nodes.append(node)
        used_state: list[torch.Tensor] = [tensor_of[a] for a in _fx_inputs(fnode) if a in tensor_of]
        if fnode.op == "call_module":
            module = model.get_submodule(fnode.target)
            node.name = fnode.target
            used_state += list(module.parameters()) + list(module.buffers())
            if is_batchnorm(module):
                node.kind, node.module = "batchnorm", module
            else:
                made = type(module)
                if parametrize.is_parametrized(module):  # ParametrizedConv2d: a Conv2d
                    made = made.__bases__[0]
                for cls, kind, names in _MODULE_KINDS:
                    if made is cls:
                        node.kind, node.weight, node.bias = kind, module.weight, module.bias
                        node.module = module  # a parametrised weight is found through it
                        node.attrs = {k: getattr(module, k) for k in names[3:]}
                        node.attrs["padding_mode"] = getattr(module, "padding_mode", "zeros")
        elif fnode.op == "call_function" and fnode.target in _LINEAR_OPS:
            kind, names = _LINEAR_OPS[fnode.target]
            bound = _bind(names, fnode.args, fnode.kwargs)
            weight, bias = bound.get("weight"), bound.get("bias")
            node.kind = kind
            node.weight = tensor_of.get(weight) if isinstance(weight, fx.Node) else None
            node.bias = tensor_of.get(bias) if isinstance(bias, fx.Node) else None
            if isinstance(weight, fx.Node) and weight not in tensor_of:
                node.kind = "op"  # weight computed at run time: not a foldable parameter
            if isinstance(bias, fx.Node) and bias not in tensor_of:
                node.kind = "op"
            node.attrs = {k: bound[k] for k in names[3:] if not isinstance(bound[k], fx.Node)}
            if len(node.attrs) < len(names) - 3:
                node.kind = "op"  # a stride or padding computed at run time
        elif fnode.op == "call_function" and node.name in CONCATS:
            node.attrs = _concat_dim(fnode.args, fnode.kwargs)
        elif fnode.op == "call_function" and fnode.target is F.batch_norm:
            bound = dict(zip(_BATCH_NORM_ARGS, fnode.args, strict=False))
            bound.update({k: v for k, v in fnode.kwargs.items() if k in _BATCH_NORM_ARGS})
            node.attrs = {
                "batch_norm": {
                    k: tensor_of.get(v, v) if isinstance(v, fx.Node) else v
                    for k, v in ((k, bound.get(k)) for k in _BATCH_NORM_ARGS[1:])
                }
            }
        for t in used_state:
            state_uses[id(t)].append(node)
        node.inputs = [value_of[a] for a in _fx_inputs(fnode) if a in value_of]
        for v in node.inputs:
            v.consumers.append(node)
        if fnode.op == "call_module" or node.kind != "op" or "batch_norm" in node.attrs:
            first = call_input(fnode.args, fnode.kwargs)  # bn(input=x), F.linear(input=x) too
            node.data = value_of.get(first) if isinstance(first, fx.Node) else None
        out = Value(len(values), node)
        values.append(out)
        node.outputs.append(out)
        value_of[fnode] = out
    return Graph("symbolic", nodes, values, dict(state_uses))


def _is_metadata(fnode: fx.Node) -> bool:
    if fnode.op == "call_method":
        return fnode.target in _METADATA
    if fnode.op == "call_function" and fnode.target is getattr and len(fnode.args) == 2:
        return fnode.args[1] in _METADATA_ATTRS
    return False


def _fx_inputs(fnode: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((fnode.args, fnode.kwargs), found.append)
    return found
