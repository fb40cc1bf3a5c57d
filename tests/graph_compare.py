"""Before/expected graph checks for pass tests, in the spirit of TVM's `CompareBeforeAfter`.

A pass test states what the pass should make of a graph; when it does not, the failure shows where
the graph differs from the expectation (a diff, or a table of op counts) instead of a bare
`assert False`. Three forms:

- `assert_rewrites_to(rewrite, before, expected, inputs)`: a graph rewrite applied to the export of a
  hand-written `before` module gives the export of a hand-written `expected` one.
- `assert_same_graph(actual, expected)`: two graphs are the same program up to node names (values
  are numbered in graph order). With the input as `expected` it is the negative case: pattern
  absent, graph unchanged.
- `assert_ops(graph, {"aten.chunk.default": 0, "higher_order.cond": 1})` and
  `assert_op_changes(before, after, {"aten.cat.default": -2})`: counts of the ops a pass adds or
  removes, for graphs too large to write out by hand.

Graphs may be given as a StepProgram, an ExportedProgram, a GraphModule or an fx.Graph.
"""

from __future__ import annotations

import difflib
import operator
from collections import Counter
from typing import Any, Callable

import torch
from torch import fx

from vdopt.program import StepProgram


def graph_of(graph: Any) -> fx.Graph:
    if isinstance(graph, StepProgram):
        graph = graph.ep
    if isinstance(graph, (torch.export.ExportedProgram, fx.GraphModule)):
        graph = graph.graph
    return graph


def op_name(target: Any) -> str:
    """`aten.cat.default`, `higher_order.cond`, `getitem`: how expectations name a call's target."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    return getattr(target, "__name__", str(target))


def op_counts(graph: Any, where: Callable[[fx.Node], bool] = lambda node: True) -> Counter:
    """How often each op is called in the graph (only the nodes `where` selects)."""
    return Counter(op_name(node.target) for node in graph_of(graph).nodes if node.op == "call_function" and where(node))


def count_mismatches(counts: Counter, expected: dict[str, int], at_least: bool) -> str:
    wrong = [(name, want, counts[name]) for name, want in sorted(expected.items())
             if (counts[name] < want if at_least else counts[name] != want)]
    return "\n".join(f"  {name}: expected {'at least ' if at_least else ''}{want}, got {got}" for name, want, got in wrong)


def assert_ops(graph: Any, expected: dict[str, int], at_least: bool = False) -> None:
    """Each named op is called exactly as often as `expected` says (0: absent), or at least that often."""
    counts = op_counts(graph)
    wrong = count_mismatches(counts, expected, at_least)
    if wrong:
        present = ", ".join(f"{name} x{count}" for name, count in sorted(counts.items()))
        raise AssertionError(f"op counts differ from the expectation:\n{wrong}\nops in the graph: {present}")


def assert_op_changes(before: Any, after: Any, changes: dict[str, int]) -> None:
    """From `before` to `after`, each op in `changes` is called that many times more (or fewer, when
    negative) and every other op as often as before."""
    old, new = op_counts(before), op_counts(after)
    expected = {name: old[name] + changes.get(name, 0) for name in {*old, *new, *changes}}
    wrong = count_mismatches(new, expected, at_least=False)
    if wrong:
        raise AssertionError(f"the pass changed op counts other than {changes}:\n{wrong}")


def is_size_arithmetic(node: fx.Node) -> bool:
    """`sym_size` and Python arithmetic on sizes: export orders these freely, so they are shown
    inline where they are used rather than as numbered values."""
    target = node.target
    return node.op == "call_function" and (target is torch.ops.aten.sym_size.int or
                                           (getattr(target, "__module__", None) == "_operator" and target is not operator.getitem))


def schema_arguments(node: fx.Node) -> list[tuple[str | None, Any]]:
    """An op's arguments by its schema, whether export passed them by position or by name, leaving
    out those equal to their default; a name is kept only where position no longer says which."""
    shown, positional = [], True
    for index, spec in enumerate(node.target._schema.arguments):
        present = index < len(node.args) or spec.name in node.kwargs
        value = node.args[index] if index < len(node.args) else node.kwargs.get(spec.name)
        if not present or (spec.has_default_value() and not isinstance(value, fx.Node) and value == spec.default_value):
            positional = False
            continue
        positional = positional and not spec.kwarg_only
        shown.append((None if positional else spec.name, value))
    return shown


def normalized(graph: Any) -> list[str]:
    """One line per node, values named %0, %1, ... in graph order and size arithmetic inline:
    equal lists mean the same program."""
    names: dict[fx.Node, str] = {}

    def show(arg: Any) -> str:
        if isinstance(arg, fx.Node):
            return names[arg]
        if isinstance(arg, (list, tuple)):
            inner = ", ".join(show(a) for a in arg)
            return f"[{inner}]" if isinstance(arg, list) else f"({inner})"
        return repr(arg)

    def call(node: fx.Node) -> str:
        if isinstance(node.target, torch._ops.OpOverload):
            arguments = schema_arguments(node)
        else:
            arguments = [(None, a) for a in node.args] + sorted(node.kwargs.items())
        return f"{op_name(node.target)}(" + ", ".join(show(v) if k is None else f"{k}={show(v)}" for k, v in arguments) + ")"

    lines = []
    for node in graph_of(graph).nodes:
        if is_size_arithmetic(node):
            names[node] = call(node)
            continue
        names[node] = f"%{len(lines)}"
        if node.op == "placeholder":
            lines.append(f"{names[node]} = input")
        elif node.op == "output":
            lines.append(f"return {show(node.args[0])}")
        elif node.op == "call_function":
            lines.append(f"{names[node]} = {call(node)}")
        else:
            lines.append(f"{names[node]} = {node.op} {node.target}{show(tuple(node.args))}")
    return lines


def assert_same_graph(actual: Any, expected: Any) -> None:
    got, want = normalized(actual), normalized(expected)
    if got != want:
        diff = "\n".join(difflib.unified_diff(want, got, "expected", "actual", lineterm=""))
        raise AssertionError(f"the graph differs from the expected one:\n{diff}")


def assert_rewrites_to(rewrite: Callable[[fx.GraphModule], fx.GraphModule], before: torch.nn.Module,
                       expected: torch.nn.Module, inputs: tuple, expected_inputs: tuple | None = None) -> None:
    """`rewrite` (GraphModule -> GraphModule) turns the export of `before` into the export of `expected`.
    Both sides are exported the same way, so the comparison sees what the rewrite changed and nothing of
    how export spells a module. `expected_inputs` are the inputs when the rewrite changes the signature."""
    expected_inputs = inputs if expected_inputs is None else expected_inputs
    rewritten = rewrite(torch.export.export(before, inputs).module())
    assert_same_graph(torch.export.export(rewritten, expected_inputs).graph, torch.export.export(expected, expected_inputs).graph)
