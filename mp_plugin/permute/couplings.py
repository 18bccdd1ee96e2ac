"""``find_couplings``: trace a model (falling back to its children) and collect its channel couplings.

Each traced graph is analysed consumer by consumer (:mod:`mp_plugin.permute.graph`), in
train and in eval mode; a coupling is kept only when both agree.
"""

from __future__ import annotations

from collections import Counter

from torch import fx, nn

from mp_plugin.permute.graph import Coupling, GraphFailure, _check_foldable, _Closure, _Fail, shared_modules
from mp_plugin.permute.ops import is_consumer, not_plain_reason
from mp_plugin.permute.trace import trace_in_mode

__all__ = ["find_couplings"]


def _analyse_graph(
    graph: fx.Graph, root: nn.Module, prefix: str, shared: dict[str, str]
) -> tuple[list[Coupling], list[GraphFailure]]:
    modules = dict(root.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    done: set[str] = set()
    couplings: list[Coupling] = []
    failures: list[GraphFailure] = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        name = f"{prefix}.{node.target}" if prefix else str(node.target)
        why = not_plain_reason(modules[str(node.target)])
        if why is not None and name not in done:
            failures.append(GraphFailure([name], f"it {why}"))
            done.add(name)
        if not is_consumer(modules[str(node.target)]):
            continue
        if name in done:
            continue
        closure = _Closure(root, prefix, calls, shared)
        try:
            if not node.args or not isinstance(node.args[0], fx.Node):
                raise _Fail("consumer input is not a traced tensor")
            closure.run(node)
            coupling = closure.coupling()
            _check_foldable(graph, root, prefix, coupling)
        except _Fail as exc:
            names = [closure.qual(str(c.target)) for c in closure.consumers] or [name]
            failures.append(GraphFailure([n for n in names if n not in done], str(exc)))
            done.update(names)
            continue
        done.update(coupling.consumers)
        couplings.append(coupling)
    return couplings, failures


def _partials(graph: fx.Graph, root: nn.Module, prefix: str, shared: dict[str, str]) -> list[Coupling]:
    """Open-ended couplings of a traced child: first input → consumers, and producers → the output."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    nodes = list(graph.nodes)
    out: list[Coupling] = []
    first = next((n for n in nodes if n.op == "placeholder"), None)
    if first is not None:
        closure = _Closure(root, prefix, calls, shared)
        closure.allow_open_input = first
        try:
            closure.run(None, first)
            if closure.consumers and not closure.producers:
                out.append(closure.coupling())
        except _Fail:
            pass
    ret = next((n for n in nodes if n.op == "output"), None)
    if ret is not None and isinstance(ret.args[0], fx.Node) and ret.args[0].op != "placeholder":
        closure = _Closure(root, prefix, calls, shared)
        closure.allow_open_output = True
        try:
            closure.run(None, ret.args[0])
            if closure.producers and not closure.consumers:
                out.append(closure.coupling())
        except _Fail:
            pass
    return out


def find_couplings(
    model: nn.Module, partials: list[Coupling] | None = None
) -> tuple[list[Coupling], list[GraphFailure], list[str]]:
    """Trace ``model`` (recursively falling back to children) and return its channel couplings.

    Args:
        model: any module.
        partials: if given, receives the open-ended couplings of children traced
            because their parent did not trace (see :mod:`mp_plugin.permute.links`).

    Returns:
        (couplings, failures, notes): legal couplings; consumers whose input
        channels cannot be permuted with the reason; and notes on modules that
        did not trace (their children were traced instead).
    """
    shared = shared_modules(model)
    couplings: list[Coupling] = []
    failures: list[GraphFailure] = []
    notes: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        if not any(True for _ in module.children()):
            if is_consumer(module):
                failures.append(GraphFailure([prefix], "its parent module could not be traced"))
            return
        try:
            graphs = [trace_in_mode(module, mode) for mode in (True, False)]
        except Exception as exc:  # noqa: BLE001 - any trace failure means: look one level deeper
            notes.append(f"{prefix or '<model>'}: not traceable ({type(exc).__name__}); traced its children")
            for cname, child in module.named_children():
                visit(child, f"{prefix}.{cname}" if prefix else cname)
            return
        (c_train, f_train), (c_eval, f_eval) = (_analyse_graph(g, module, prefix, shared) for g in graphs)
        c = [cp for cp in c_eval if cp in c_train]  # a branch under `if self.training` must agree too
        changed = [cp for cp in c_eval + c_train if cp not in c]
        couplings.extend(c)
        failures.extend(f_eval)
        seen = {name for f in f_eval for name in f.consumers}
        failures.extend(
            GraphFailure(rest, f.reason) for f in f_train if (rest := [n for n in f.consumers if n not in seen])
        )
        for cp in changed:
            failures.append(
                GraphFailure(
                    [n for n in cp.consumers if n not in seen],
                    "its coupling differs between train and eval mode (code under `if self.training`)",
                )
            )
        for inner, cls in getattr(graphs[1], "opaque", {}).items():
            inside = [
                f"{prefix}.{inner}.{n}" if prefix else f"{inner}.{n}"
                for n, m in module.get_submodule(inner).named_modules()
                if n and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
            ]
            if inside:
                failures.append(
                    GraphFailure(inside, f"inside {cls} '{inner}', which timm marks as not traceable (kept whole)")
                )
        if partials is not None and prefix:
            p_train, p_eval = (_partials(g, module, prefix, shared) for g in graphs)
            partials.extend(p for p in p_eval if p in p_train)

    visit(model, "")
    return couplings, failures, notes
