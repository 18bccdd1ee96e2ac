"""Find channel couplings from the module graph (torch.fx), for permutations folded into weights.

A *coupling* is a channel space shared by some producer layers (their output
rows), per-channel ops in between, and consumer layers (their input columns).
It is found by a closure over the traced graph: starting at a consumer's input
value, every value that carries these channels must come from a producer or a
channel op, and every use of such a value must be a channel op or a consumer's
input. Any other use (a residual add with an outside value, a reshape, a
concatenation, the graph output, an unknown module) makes the coupling illegal,
and it is reported with the reason instead of being permuted.

The graph is traced in train and in eval mode; a coupling is kept only when both
agree (a branch under ``if self.training`` is seen in one of them only).

When the whole model does not trace, each child module is traced on its own
(recursively); a coupling is then found only if it lies entirely inside one
traced child, which keeps the analysis sound.
"""

from __future__ import annotations

import builtins
import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from mp_plugin.permute.ops import (
    BINARY_FUNCTIONS,
    BINARY_METHODS,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    POOL_FUNCTIONS,
    REDUCE_METHODS,
    is_consumer,
    is_producer,
    module_channel_op,
    not_plain_reason,
    pool_dims,
    producer_axis,
)

__all__ = ["Coupling", "GraphFailure", "shared_modules", "tensor_by_name"]

_SHAPE_METHODS = {"size", "dim"}
_ADDITIVE = {operator.add, operator.sub, operator.iadd, torch.add, torch.sub, "add", "add_", "sub", "sub_"}


@dataclass
class Coupling:
    """A legal channel permutation site.

    Attributes:
        channels: number of channels C.
        axis: channel axis of the values (-1 Linear layout, 1 conv layout).
        producers: module names whose weight rows (and bias) are permuted.
        ops: (module name, [(tensor attribute, axis)]) per-channel modules to permute.
        params: (qualified parameter/buffer name, axis) tensors used elementwise.
        consumers: module names whose weight columns (channel blocks) are permuted.
        region: name of the traced module the coupling was found in ("" = whole model).
        open_input / open_output: for a partial coupling of a traced child whose parent
            did not trace: the channels enter as the child's input ``open_input`` (no
            producer inside) or leave as its output (no consumer inside).
        verify_module: a linked coupling (two partials joined at run time) is kept only
            if this module's output is unchanged on the captured example input.
    """

    channels: int
    axis: int
    producers: list[str]
    ops: list[tuple[str, list[tuple[str, int]]]]
    params: list[tuple[str, int]]
    consumers: list[str]
    region: str = ""
    open_input: str | None = None
    open_output: bool = False
    verify_module: str | None = None


@dataclass
class GraphFailure:
    """A consumer whose input channels cannot be permuted, and why."""

    consumers: list[str]
    reason: str


def shared_modules(model: nn.Module) -> dict[str, str]:
    """Module names that share a module object or a weight with another name → description."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    out: dict[str, str] = {}
    for names in owners.values():
        if len(names) > 1:
            for full in names:
                out[full.rsplit(".", 1)[0] if "." in full else ""] = f"weight shared by {', '.join(names)}"
    return out


def _desc(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "placeholder":
        return f"the traced input {node.target!r}"
    if node.op == "output":
        return "the traced output (residual stream or returned value)"
    return f"{node.op} {node.target}"


class _Fail(Exception):
    pass


class _Closure:
    def __init__(self, root: nn.Module, prefix: str, calls: Counter, shared: dict[str, str]) -> None:
        self.root = root
        self.modules = dict(root.named_modules())
        self.prefix = prefix
        self.calls = calls
        self.shared = shared
        self.values: set[fx.Node] = set()
        self.producers: list[fx.Node] = []
        self.consumers: list[fx.Node] = []
        self.op_nodes: list[fx.Node] = []
        self.param_nodes: list[fx.Node] = []
        self.axis_req: set[int] = set()
        self.pool_dims: set[int] = set()
        self.queue: list[fx.Node] = []
        self.allow_open_input: fx.Node | None = None
        self.allow_open_output = False
        self.open_input: fx.Node | None = None
        self.open_output = False

    def qual(self, target: str) -> str:
        return f"{self.prefix}.{target}" if self.prefix else str(target)

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[str(node.target)]

    # ---- classification -------------------------------------------------------------------
    def channel_inputs(self, node: fx.Node) -> list[fx.Node]:
        """Inputs of an op node that carry the channels; raises _Fail if the node is not a channel op."""
        args, kwargs = list(node.args), dict(node.kwargs)
        if node.op == "call_module":
            mod = self.module(node)
            if is_producer(mod):
                raise _Fail("unexpected")
            why = not_plain_reason(mod)
            if why is not None:
                raise _Fail(f"{_desc(node)} {why}")
            if len(args) != 1 or kwargs:
                raise _Fail(f"{_desc(node)} takes extra inputs")
            if pool_dims(mod) is not None:
                self.pool_dims.add(pool_dims(mod))
            return [args[0]]
        fn = node.target
        others = args[1:] + list(kwargs.values())
        if (
            node.op == "call_function"
            and fn in ELEMENTWISE_FUNCTIONS
            or node.op == "call_method"
            and fn in (ELEMENTWISE_METHODS)
        ):
            self._scalars(node, others)
            return [args[0]]
        if node.op == "call_function" and fn in POOL_FUNCTIONS:
            self._scalars(node, others)
            self.axis_req.add(1)
            self.pool_dims.add(2)
            return [args[0]]
        if node.op == "call_method" and fn in REDUCE_METHODS:
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else dims
            if not isinstance(dims, (tuple, list)) or not dims or any(not isinstance(d, int) or d < 2 for d in dims):
                raise _Fail(f"{_desc(node)} reduces over dims {dims!r}, which may include the channel axis")
            self.axis_req.add(1)
            return [args[0]]
        if (node.op == "call_function" and fn in BINARY_FUNCTIONS) or (
            node.op == "call_method" and fn in BINARY_METHODS
        ):
            operands = args[:2] if len(args) >= 2 else args + [kwargs.get("other")]
            self._scalars(node, args[2:] + [v for key, v in kwargs.items() if key != "other"])
            tensors = []
            if fn in _ADDITIVE and sum(isinstance(a, fx.Node) and a.op != "get_attr" for a in operands) == 2:
                raise _Fail(
                    f"{_desc(node)} adds two computed tensors (a residual/skip add or two branches summed); "
                    "such sums stay unpermuted"
                )
            for a in operands:
                if isinstance(a, fx.Node):
                    if a.op == "get_attr":
                        if a not in self.param_nodes:  # this node may be classified twice
                            self.param_nodes.append(a)
                    else:
                        tensors.append(a)
                elif not isinstance(a, (int, float, bool)):
                    raise _Fail(f"{_desc(node)} has an operand of type {type(a).__name__}")
            return tensors
        raise _Fail(f"channels flow through {_desc(node)}, which is not known to act per channel")

    def _scalars(self, node: fx.Node, others: list) -> None:
        for a in others:
            if isinstance(a, fx.Node):
                raise _Fail(f"{_desc(node)} mixes in another tensor ({_desc(a)})")

    # ---- closure ------------------------------------------------------------------------------
    def add(self, v: fx.Node) -> None:
        if v not in self.values:
            self.values.add(v)
            self.queue.append(v)

    def run(self, seed_consumer: fx.Node | None, seed_value: fx.Node | None = None) -> None:
        if seed_consumer is not None:
            self.consumers.append(seed_consumer)
            self.add(seed_consumer.args[0])
        if seed_value is not None:
            self.add(seed_value)
        while self.queue:
            v = self.queue.pop()
            # backward: where do these channels come from?
            if v.op == "call_module" and is_producer(self.module(v)):
                self.producers.append(v)
            elif v.op == "placeholder" and v is self.allow_open_input:
                self.open_input = v
            elif v.op in ("call_module", "call_function", "call_method"):
                self.op_nodes.append(v)
                for a in self.channel_inputs(v):
                    self.add(a)
            else:
                raise _Fail(f"channels come from {_desc(v)}")
            # forward: every use must be a channel op or a consumer's input
            for u in v.users:
                if u.op == "call_module" and is_consumer(self.module(u)):
                    if u.args[0] is not v or len(u.args) != 1 or u.kwargs:
                        raise _Fail(f"{_desc(u)} uses the channels in an unexpected way")
                    if u not in self.consumers:
                        self.consumers.append(u)
                elif u.op == "call_function" and u.target is builtins.getattr and u.args[1] in ("shape", "dtype"):
                    continue
                elif u.op == "call_method" and u.target in _SHAPE_METHODS:
                    continue
                elif u.op in ("call_module", "call_function", "call_method"):
                    self.channel_inputs(u)  # raises when u is not a channel op
                    self.add(u)
                elif u.op == "output" and self.allow_open_output and u.args[0] is v:
                    self.open_output = True
                else:
                    raise _Fail(f"channels flow into {_desc(u)}")

    def coupling(self) -> Coupling:
        if not self.producers and self.open_input is None:
            raise _Fail("no producer layer found")
        if not self.consumers and not self.open_output:
            raise _Fail("no consumer layer found")
        ends = self.producers or self.consumers
        mods = [self.module(p) for p in ends]
        axes = {producer_axis(m) for m in mods}
        if len(axes) != 1:
            raise _Fail("producers disagree on the channel axis (Linear and conv mixed)")
        axis = axes.pop()
        chans = {m.weight.shape[0] if self.producers else m.weight.shape[1] for m in mods}
        if len(chans) != 1:
            raise _Fail(f"producers have different widths {sorted(chans)}")
        c = chans.pop()
        if self.axis_req - {axis}:
            raise _Fail("an op needs channel axis 1 but the producer is a Linear (channels last)")
        conv_dims = {1 if isinstance(m, nn.Conv1d) else 2 for m in mods if not isinstance(m, nn.Linear)}
        if self.pool_dims and conv_dims and self.pool_dims != conv_dims:
            raise _Fail(
                f"a {sorted(self.pool_dims)[0]}-D pool on the output of {sorted(conv_dims)[0]}-D convs "
                "(a 2-D pool reads an (N, C, L) tensor as one image and pools across channels)"
            )
        ops: list[tuple[str, list[tuple[str, int]]]] = []
        for node in self.op_nodes:
            if node.op != "call_module":
                continue
            op, why = module_channel_op(self.module(node), c)
            if op is None:
                raise _Fail(f"{_desc(node)}: {why}")
            if op.axis is not None and op.axis != axis:
                raise _Fail(f"{_desc(node)} acts on channel axis {op.axis}, the channels are on axis {axis}")
            ops.append((self.qual(str(node.target)), op.tensors))
        for node in self.consumers:
            m = self.module(node)
            if producer_axis(m) != axis:
                raise _Fail(f"{_desc(node)} reads channels on a different axis than its producer writes them")
            if m.weight.shape[1] != c:
                raise _Fail(f"{_desc(node)} expects {m.weight.shape[1]} input channels, producer gives {c}")
        params: list[tuple[str, int]] = []
        reads = (
            Counter(str(n.target) for n in self.param_nodes[0].graph.nodes if n.op == "get_attr")
            if (self.param_nodes)
            else Counter()
        )
        for node in self.param_nodes:
            t = _tensor_attr(self.root, str(node.target))
            if t is None:
                raise _Fail(
                    f"{node.target} is a plain tensor attribute, not a parameter or buffer: "
                    "a permutation of it would not be saved"
                )
            if t.numel() == 1:
                continue
            if reads[str(node.target)] > 1:  # fx makes one get_attr node per read
                raise _Fail(f"tensor {node.target} is read {reads[str(node.target)]} times in forward")
            if any(u not in self.values and u.op != "output" for u in node.users) or len(node.users) != 1:
                raise _Fail(f"tensor {node.target} is also used outside this coupling")
            if axis == -1 and t.shape[-1] == c and t.numel() == c:
                params.append((self.qual(str(node.target)), t.dim() - 1))
            elif axis == 1 and t.dim() >= 3 and t.shape[-3] == c and t.numel() == c:
                params.append((self.qual(str(node.target)), t.dim() - 3))
            else:
                raise _Fail(f"tensor {node.target} of shape {tuple(t.shape)} does not broadcast per channel")
        for node in self.producers + self.consumers + [n for n in self.op_nodes if n.op == "call_module"]:
            name = self.qual(str(node.target))
            stateful = any(True for _ in self.module(node).parameters()) or any(
                True for _ in self.module(node).buffers()
            )
            if self.calls[node.target] > 1 and stateful:
                raise _Fail(f"module {name} is called {self.calls[node.target]} times (shared weights)")
            if name in self.shared:
                raise _Fail(f"module {name}: {self.shared[name]}")
        return Coupling(
            channels=c,
            axis=axis,
            producers=[self.qual(str(p.target)) for p in self.producers],
            ops=ops,
            params=params,
            consumers=[self.qual(str(p.target)) for p in self.consumers],
            region=self.prefix,
            open_input=str(self.open_input.target) if self.open_input is not None else None,
            open_output=self.open_output,
        )


def _tensor_attr(root: nn.Module, target: str) -> torch.Tensor | None:
    """The parameter or buffer ``target`` of ``root``; None for a plain tensor attribute."""
    for getter in (root.get_parameter, root.get_buffer):
        try:
            return getter(target)
        except AttributeError:
            continue
    return None


def _tensor_owner(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    owner, _, attr = qualified.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def _check_foldable(graph: fx.Graph, root: nn.Module, prefix: str, coupling: Coupling) -> None:
    """Raise _Fail when folding ``coupling`` in place could change the function or not survive a reload.

    * a tensor of a coupled module is also read directly in ``forward`` (an fx
      ``get_attr``, e.g. ``F.linear(x, self.fc.weight)``) outside the coupling;
    * a coupled module's weight is parametrized (``weight_norm``…) or recomputed by a hook:
      the fold would write to a temporary;
    * a per-channel tensor is a non-persistent buffer: a state_dict reload would not permute it.
    """

    def qual(target: str) -> str:
        return f"{prefix}.{target}" if prefix else str(target)

    legit = {name for name, _ in coupling.params}
    reads = {qual(str(n.target)) for n in graph.nodes if n.op == "get_attr"} - legit
    names = coupling.producers + coupling.consumers + [name for name, _ in coupling.ops]
    for name in names:
        mod = root.get_submodule(name[len(prefix) + 1 :] if prefix else name)
        computed = getattr(mod, "weight", None) is not None and "weight" not in {**mod._parameters, **mod._buffers}
        if parametrize.is_parametrized(mod) or computed:
            raise _Fail(f"module {name} has a parametrized or recomputed weight (e.g. weight_norm)")
        for pname, _ in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if f"{name}.{pname}" in reads:
                raise _Fail(f"{name}.{pname} is also read directly in forward, outside its module call")
    for name, tensors in coupling.ops:
        mod = root.get_submodule(name[len(prefix) + 1 :] if prefix else name)
        for attr, _ in tensors:
            if attr in mod._non_persistent_buffers_set:
                raise _Fail(f"{name}.{attr} is a non-persistent buffer: a reloaded state_dict would not permute it")
    for qualified, _ in coupling.params:
        owner, attr = _tensor_owner(root, qualified[len(prefix) + 1 :] if prefix else qualified)
        if attr in owner._non_persistent_buffers_set:
            raise _Fail(f"{qualified} is a non-persistent buffer: a reloaded state_dict would not permute it")


def tensor_by_name(model: nn.Module, qualified: str) -> torch.Tensor:
    """Parameter or buffer ``qualified`` of ``model``."""
    try:
        return model.get_parameter(qualified)
    except AttributeError:
        return model.get_buffer(qualified)
