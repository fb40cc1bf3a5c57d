"""Runs passes over the step program in an explicit order and holds each to its contract.

A pass is a named unit (ARCHITECTURE contract 4): `run(program, **params) -> program`, pure (the
input program, graph and weights, is never modified: calibration and the tests apply many passes to
one capture), with the facts it requires of its input and the facts it guarantees of its output.
A fact is a predicate over the program registered under its name (`register_fact`), not a label:
the manager checks a pass's requirements before it runs and its guarantees after, so a pass that
promises more than it does fails here instead of in a bundle. A pass that names a fact with no
predicate is refused when it is defined.

Parameters are bound against the pass's signature before it runs: a parameter it does not take (or
a missing one) is the user's error and says which parameters the pass accepts; a `TypeError` from
inside the pass is a bug and surfaces as one. The manager times each pass, records it with its
parameters (these go into the manifest), and with `dump_ir` writes a readable graph after every pass
(`000_captured.txt`, `001_<pass>.txt`, ...).
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

from vdopt.capture import export_step
from vdopt.errors import PassError
from vdopt.module_stack import module_stack
from vdopt.program import StepProgram
from vdopt.ranges import named_range


# ----- facts ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fact:
    name: str
    meaning: str
    holds: Callable[[StepProgram], bool]


FACTS: dict[str, Fact] = {}


def register_fact(name: str, meaning: str) -> Callable[[Callable[[StepProgram], bool]], Callable[[StepProgram], bool]]:
    """Registers the decorated predicate as the fact `name`, which passes may then require or guarantee."""

    def register(holds: Callable[[StepProgram], bool]) -> Callable[[StepProgram], bool]:
        if name in FACTS:
            raise ValueError(f"fact '{name}' is registered twice.")
        FACTS[name] = Fact(name, meaning, holds)
        return holds

    return register


def module_paths(ep: torch.export.ExportedProgram) -> set[str]:
    return {fqn for node in ep.graph.nodes for fqn, _ in module_stack(node)}


def uncond_inputs(program: StepProgram) -> list[str]:
    return [spec.name for spec in program.inputs if spec.name.startswith("uncond.")]


def conditionals(program: StepProgram) -> list[torch.fx.Node]:
    return [node for node in program.ep.graph.nodes if node.target is torch.ops.higher_order.cond]


def cache_residuals(program: StepProgram) -> list[str]:
    return [spec.name for spec in program.state if spec.name.startswith("state.cache.")]


def graph_tensors(program: StepProgram) -> dict[str, torch.Tensor]:
    return {**program.ep.state_dict, **{k: v for k, v in program.ep.constants.items() if isinstance(v, torch.Tensor)}}


def holds_values(tensor: torch.Tensor, values: list[float]) -> bool:
    """Whether `tensor` is the list `values` (under FakeTensorMode only its length can be read)."""
    if isinstance(tensor, FakeTensor):
        return tuple(tensor.shape) == (len(values),)
    return tensor.tolist() == values


@register_fact("guidance", "the step runs the classifier-free-guidance batch on cond and uncond inputs")
def has_guidance(program: StepProgram) -> bool:
    return program.guidance and bool(uncond_inputs(program))


@register_fact("guidance_matches_sampler", "the step has uncond inputs exactly when its sampler uses guidance")
def guidance_matches_sampler(program: StepProgram) -> bool:
    return program.guidance == bool(uncond_inputs(program)) == program.recipe.sampler.uses_guidance


@register_fact("blocks_found", "the family's transformer blocks are in the graph's nn_module_stack metadata")
def blocks_found(program: StepProgram) -> bool:
    return any(program.descriptor.is_block(fqn) for fqn in module_paths(program.ep))


@register_fact("step_table_in_graph", "the step table the manifest records is the one in the graph's buffers, "
                                      "and the sampler's step count is its length")
def step_table_in_graph(program: StepProgram) -> bool:
    tensors = graph_tensors(program)
    return program.recipe.sampler.steps == program.num_steps and all(
        name in tensors and holds_values(tensors[name], values) for name, values in program.step_table.items())


@register_fact("uncached", "no cache is inserted yet (a cache is built for the schedule and rows it sees, "
                           "and a second one would cache the cached body)")
def uncached(program: StepProgram) -> bool:
    return not conditionals(program) and not cache_residuals(program) and "cache" not in program.extras


@register_fact("cached", "the step graph decides with a conditional, and the cached residuals are declared state "
                         "that the step takes and returns")
def cached(program: StepProgram) -> bool:
    residuals = cache_residuals(program)
    inputs, outputs = {s.name for s in program.inputs}, {s.name for s in program.outputs}
    return bool(conditionals(program)) and bool(residuals) and all(r in inputs and r in outputs for r in residuals) \
        and "cache" in program.extras


def pruned_paths(program: StepProgram) -> list[str]:
    """The module paths of the blocks `prune_temporal` removed."""
    return [fqn for paths in program.extras.get("pruned", {}).values() for fqn in paths]


@register_fact("unpruned", "no block is pruned (a weights file for the whole network fits the program)")
def unpruned(program: StepProgram) -> bool:
    return not pruned_paths(program)


# ----- passes ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[..., StepProgram]
    doc: str
    requires: tuple[str, ...] = ()
    guarantees: tuple[str, ...] = ()
    invalidates: tuple[str, ...] = ()  # facts that stop holding: a later pass requiring one must run before this one
    optional: bool = False  # lowering prep: skipped (not an error) when its requirements do not hold

    def __post_init__(self) -> None:
        unknown = [name for name in (*self.requires, *self.guarantees, *self.invalidates) if name not in FACTS]
        if unknown:
            raise ValueError(f"pass '{self.name}' names {', '.join(unknown)}, which no predicate defines; register "
                             f"one with @register_fact before defining the pass (known facts: {', '.join(sorted(FACTS))}).")

    def accepted_parameters(self) -> str:
        parameters = list(inspect.signature(self.run).parameters.values())[1:]
        names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if any(p.kind is p.VAR_KEYWORD for p in parameters):
            names.append("**other keywords the pass checks itself")
        return ", ".join(names) or "none"

    def bind(self, program: StepProgram, params: dict[str, Any]) -> inspect.BoundArguments:
        """The call `run(program, **params)`, or a PassError naming what does not fit the pass's signature."""
        try:
            return inspect.signature(self.run).bind(program, **params)
        except TypeError as exc:
            raise PassError(f"pass '{self.name}': bad parameters {params}: {exc}. It accepts: {self.accepted_parameters()}.") from None


def unmet(program: StepProgram, names: tuple[str, ...]) -> list[Fact]:
    return [FACTS[name] for name in names if not FACTS[name].holds(program)]


def described(facts: list[Fact]) -> str:
    return "; ".join(f"{f.name} ({f.meaning})" for f in facts)


# ----- graph helpers for passes ---------------------------------------------------------------

def with_own_graphs(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Gives `module`'s nodes their own metadata and its branch modules (`torch.cond`'s) their own graphs."""
    for node in module.graph.nodes:
        node.meta = {key: copy.copy(value) if isinstance(value, (dict, list)) else value for key, value in node.meta.items()}
    for name, child in list(module.named_children()):
        if isinstance(child, torch.fx.GraphModule):
            setattr(module, name, with_own_graphs(torch.fx.GraphModule(child, copy.deepcopy(child.graph))))
    return module


def editable_module(program: StepProgram) -> torch.fx.GraphModule:
    """The program's unlifted module, sharing nothing with the program but its tensors, so a pass may
    edit and re-export it. `ExportedProgram.module()` alone is not enough: it copies the graph, but
    each node's metadata only one level deep (re-export writes annotations into the nested dicts), and
    it keeps the program's own `torch.cond` branch modules."""
    return with_own_graphs(program.ep.module())


def rewrite_graph(program: StepProgram, rewrite: Callable[[torch.fx.GraphModule], bool]) -> StepProgram:
    """Applies an FX rewrite to the program's unlifted graph and re-exports it.

    `rewrite` edits the GraphModule in place and returns whether it changed anything. The module
    is the program's `editable_module` (its tensors are shared, so a rewrite must not write to them).
    Re-export keeps `nn_module_stack` and recomputes every node's shapes, so a rewrite never has to.
    """
    with program.tracing():
        module = editable_module(program)
        if not rewrite(module):
            return program
        module.graph.eliminate_dead_code()
        module.graph.lint()
        module.recompile()
        return program.replace(ep=export_step(module, program.example_inputs, program.dims, program.multiples, [s.shape for s in program.state]))


def readable_graph(program: StepProgram) -> str:
    return program.ep.graph_module.print_readable(print_output=False, include_stride=False, include_device=False)


def call_function_count(program: StepProgram) -> int:
    return sum(1 for node in program.ep.graph.nodes if node.op == "call_function")


# ----- the manager ----------------------------------------------------------------------------

class PassManager:
    def __init__(self, passes: list[tuple[Pass, dict[str, Any]]], dump_ir: str | Path | None = None, log: Callable[[str], None] | None = None):
        self.passes = passes
        self.dump_ir = Path(dump_ir) if dump_ir else None
        self.log = log or (lambda message: None)

    def _dump(self, index: int, name: str, program: StepProgram) -> None:
        if self.dump_ir is not None:
            self.dump_ir.mkdir(parents=True, exist_ok=True)
            (self.dump_ir / f"{index:03d}_{name}.txt").write_text(readable_graph(program))

    def run(self, program: StepProgram) -> StepProgram:
        self._dump(0, "captured", program)
        for index, (spec, params) in enumerate(self.passes, start=1):
            missing = unmet(program, spec.requires)
            if missing and spec.optional:
                self.log(f"{spec.name}: skipped (needs {', '.join(f.name for f in missing)})")
                continue
            if missing:
                raise PassError(f"pass '{spec.name}' requires {described(missing)}, which the program does not have "
                                f"(passes before it: {', '.join(r['name'] for r in program.passes) or 'none'}).")
            call = spec.bind(program, params)
            nodes_before = call_function_count(program)
            start = time.perf_counter()
            with named_range(f"vdopt/compile/pass {spec.name}"):
                result = spec.run(*call.args, **call.kwargs)
            seconds = time.perf_counter() - start
            broken = unmet(result, spec.guarantees)
            if broken:
                raise PassError(f"pass '{spec.name}' guarantees {described(broken)}, which does not hold of its output: "
                                f"a bug in the pass.")
            kept = [name for name in spec.invalidates if FACTS[name].holds(result)]
            if kept:
                raise PassError(f"pass '{spec.name}' declares that it ends {', '.join(kept)}, which still holds of its "
                                f"output: a bug in the pass (the recipe order is checked against what it declares).")
            record = {"name": spec.name, "params": params, "seconds": round(seconds, 4),
                      "nodes_before": nodes_before, "nodes_after": call_function_count(result)}
            result = result.replace(passes=(*result.passes, record))
            self.log(f"{spec.name}: {seconds * 1000:.1f} ms, {nodes_before} -> {record['nodes_after']} nodes")
            self._dump(index, spec.name, result)
            program = result
        return program
