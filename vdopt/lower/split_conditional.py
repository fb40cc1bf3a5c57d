"""Split a step program at its conditional into head, compute, reuse and tail programs.

Why: TensorRT's `if` layers may cost both branches, and a data-dependent gather inside a branch
is not something every engine builder accepts. ARCHITECTURE contract 5 keeps the skip decision on
the device; for such backends the step is cut at the `torch.cond` that `insert_cache` made:

    head(step inputs)            -> flag, branch operands, values the tail needs
    compute(operands) | reuse(operands) -> branch results      (the runtime reads the one-byte flag)
    tail(step inputs, head values, branch results) -> step outputs

Each part is its own exported program, lowered by the same backend as an unsplit step. Values
crossing a cut are named once (`flag`, `head.K`, `branch.K`; step inputs and outputs keep their
names), and each part lists the names it reads and writes, so the runtime wires them by name.
Shapes of cut values are expressed in the latent dims (`frames`, `height_units`, ...) like every
other manifest shape, which is what an engine needs for its optimisation profiles.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import sympy
import torch
from torch import fx

from vdopt.capture import user_input_nodes
from vdopt.errors import LoweringError, first_line
from vdopt.program import LATENT_DIMS, StepProgram, TensorSpec, dtype_name
from vdopt.safety import evaluate_shape

FLAG = "flag"
PART_NAMES = ("head", "compute", "reuse", "tail")


@dataclass(frozen=True)
class Part:
    """One piece of a split step: a program whose inputs/outputs are named values of the step."""

    name: str
    program: StepProgram


@dataclass(frozen=True)
class SplitStep:
    parts: tuple[Part, ...]  # head, compute, reuse, tail
    flag: str = FLAG

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)


def conditionals(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.cond]


def is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def build_part(root: fx.GraphModule, nodes: list[fx.Node], outputs: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A GraphModule computing `outputs` from `nodes` (in order); every other node they read becomes
    an input (in first-use order), except parameters, which are copied, and
    symbolic sizes computed elsewhere, which are recomputed here from their own inputs."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op == "get_attr":
                env[node] = graph.get_attr(node.target)
            elif node.op == "call_function" and not is_tensor(node):
                env[node] = graph.node_copy(node, lookup)
            else:
                env[node] = graph.placeholder(node.name)
                inputs.append(node)
            env[node].meta = dict(node.meta)
        return env[node]

    for node in nodes:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(lookup(n) for n in outputs))
    # placeholders must come first in an FX graph; those created on first use sit between nodes
    for placeholder in reversed([env[n] for n in inputs]):
        next(iter(graph.nodes)).prepend(placeholder)
    graph.lint()
    return fx.GraphModule(root, graph), inputs


def contiguous_outputs(part: fx.GraphModule, examples: list[torch.Tensor]) -> fx.GraphModule:
    """The part with each output whose example is a view with other strides (a transpose, an expanded scalar)
    cloned contiguous. Every part reads its inputs at contiguous strides, so a view handed across a cut would be
    copied by the runtime between two calls; the compiled part writes it contiguous itself instead."""
    output = next(n for n in part.graph.nodes if n.op == "output")
    handed = list(output.args[0])
    for k, example in enumerate(examples):
        if not example.is_contiguous():
            with part.graph.inserting_before(output):
                handed[k] = part.graph.call_function(torch.ops.aten.clone.default, (handed[k],),
                                                     {"memory_format": torch.contiguous_format})
    output.args = (tuple(handed),)
    part.recompile()
    return part


def fetch(root: torch.nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), root)


def branch_part(root: fx.GraphModule, branch: fx.Node, operands: list[fx.Node]) -> fx.GraphModule:
    """The branch subgraph inlined over the runtime operands (all of them, in order, so compute and
    reuse share one signature); the weights it reads become attributes, the ones it ignores are dropped."""
    subgraph = root.get_submodule(branch.target)
    graph = fx.Graph()
    attributes = {}
    env: dict[fx.Node, fx.Node] = {}
    runtime = {op: graph.placeholder(op.name) for op in operands if op.op != "get_attr"}
    for placeholder, op in zip([n for n in subgraph.graph.nodes if n.op == "placeholder"], operands):
        if op.op != "get_attr":
            env[placeholder] = runtime[op]
        elif placeholder.users:
            env[placeholder] = graph.get_attr(op.target)
            attributes[op.target] = fetch(root, op.target)
    for node in subgraph.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], lambda a: env[a]))
            continue
        if node.op == "get_attr":
            attributes[node.target] = fetch(subgraph, node.target)
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.lint()
    return fx.GraphModule(attributes, graph)


SIZE_SYMBOLS = {"batch": sympy.Symbol("batch"), **{name: sympy.Symbol(name) for dim in LATENT_DIMS for name in (dim, f"{dim}_units")}}


def manifest_size(spec: TensorSpec, size: int | str) -> sympy.Expr | int:
    """A manifest size as a sympy expression, built by the size grammar (vdopt.safety), never `sympify`."""
    try:
        return evaluate_shape(str(size), SIZE_SYMBOLS)
    except ValueError as exc:
        raise LoweringError(f"input '{spec.name}' has the size {str(size)[:80]!r}, which is not an expression of the "
                            f"latent dims: {exc}.") from None


def size_namer(program: StepProgram):
    """Names sizes in the latent dims: each input's export symbols are solved against the
    manifest shape of that input (`2*s1` ~ `2*height_units` gives s1 = height_units)."""
    solved: dict[sympy.Symbol, sympy.Expr] = {}
    for node, spec in zip(user_input_nodes(program.ep), program.inputs):
        for size, named in zip(node.meta["val"].shape, spec.shape):
            if isinstance(size, torch.SymInt) and len(size.node.expr.free_symbols) == 1:
                (symbol,) = size.node.expr.free_symbols
                if symbol not in solved:
                    solved[symbol] = sympy.solve(size.node.expr - manifest_size(spec, named), symbol)[0]

    def name(size) -> int | str:
        if not isinstance(size, torch.SymInt):
            return int(size)
        expr = size.node.expr.xreplace(solved)
        return int(expr) if expr.is_number else str(expr).replace(" ", "")

    return name


def export_part(name: str, module: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """Every dim of every input is left to export (`Dim.AUTO`): relations between the cut values'
    sizes are whatever the ops in the part imply. Sizes 0 and 1 stay static, as export would make them."""
    shapes = tuple({d: torch.export.Dim.AUTO for d in range(t.dim()) if t.shape[d] > 1} or None for t in example)
    try:
        with torch.no_grad():
            return torch.export.export(module, example, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # noqa: BLE001
        raise LoweringError(f"the {name} part of the split step could not be exported: {type(exc).__name__}: "
                            f"{first_line(exc)}") from exc


def split_conditional(program: StepProgram) -> SplitStep | None:
    """The step cut at its one conditional, or None when it has none (nothing to split)."""
    with program.tracing():
        return split_traced(program)


def split_traced(program: StepProgram) -> SplitStep | None:
    module = program.ep.module()
    graph = module.graph
    found = conditionals(graph)
    if not found:
        return None
    if len(found) > 1:
        raise LoweringError(f"the step program has {len(found)} conditionals; splitting handles exactly one.")
    cond = found[0]
    pred, true_branch, false_branch, operands = cond.args
    order = {n: k for k, n in enumerate(graph.nodes)}
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    head_nodes = [n for n in body if order[n] < order[cond]]
    results = sorted((u for u in cond.users), key=lambda n: n.args[1])
    if any(u.target is not operator.getitem for u in results):
        raise LoweringError("a conditional's results are used other than by index; cannot split there.")
    result_set = set(results)
    tail_nodes = [n for n in body if order[n] > order[cond] and n not in result_set]

    step_inputs = [n for n in graph.nodes if n.op == "placeholder"]
    output_node = next(n for n in graph.nodes if n.op == "output")
    step_outputs = list(output_node.args[0])
    runtime_operands = [op for op in operands if op.op != "get_attr"]
    head_set, read_later = set(head_nodes), set(tail_nodes) | {output_node}
    head_outputs = [pred, *[op for op in runtime_operands if op in head_set]]
    already = set(head_outputs)
    head_outputs += [n for n in head_nodes if is_tensor(n) and n not in already and not read_later.isdisjoint(n.users)]

    name_size = size_namer(program)
    names: dict[fx.Node, str] = {n: spec.name for n, spec in zip(step_inputs, program.inputs)}
    names[pred] = FLAG
    for k, node in enumerate(head_outputs[1:]):
        names.setdefault(node, f"head.{k}")
    for node in results:
        names[node] = f"branch.{node.args[1]}"

    def spec(node: fx.Node) -> TensorSpec:
        val = node.meta["val"]
        return TensorSpec(names[node], tuple(name_size(d) for d in val.shape), dtype_name(val.dtype))

    head, head_in = build_part(module, head_nodes, head_outputs)
    compute = branch_part(module, true_branch, list(operands))
    reuse = branch_part(module, false_branch, list(operands))
    tail, tail_in = build_part(module, tail_nodes, step_outputs)

    values = dict(zip(step_inputs, program.example_inputs))
    examples = head(*(values[n] for n in head_in))
    head = contiguous_outputs(head, examples)
    values.update(zip(head_outputs, (t.contiguous() for t in examples)))
    # reuse gives results of the same shapes as compute without its data-dependent gather, which
    # fake tensors (full-size checks) cannot evaluate
    examples = reuse(*(values[n] for n in runtime_operands))
    compute, reuse = (contiguous_outputs(part, examples) for part in (compute, reuse))
    values.update({node: examples[node.args[1]].contiguous() for node in results})
    branch_specs = [spec(n) for n in results]
    parts = []
    for name, part, part_in, out_specs in (
        ("head", head, head_in, [spec(n) for n in head_outputs]),
        ("compute", compute, runtime_operands, branch_specs),
        ("reuse", reuse, runtime_operands, branch_specs),
        ("tail", tail, tail_in, list(program.outputs)),
    ):
        example = tuple(values[n] for n in part_in)
        ep = export_part(name, part, example)
        inputs = tuple(spec(n) for n in part_in)
        parts.append(Part(name, program.replace(ep=ep, inputs=inputs, outputs=tuple(out_specs), state=(),
                                                example_inputs=example)))
    return SplitStep(tuple(parts))
