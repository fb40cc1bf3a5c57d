"""Runs passes over the step program in an explicit order, timing each and dumping the IR.

A pass is a named unit (contract 4): `run(program, **params) -> program`, with the facts it
requires of its input and the facts it guarantees of its output. The manager checks both, records
each pass with its parameters and wall time (these go into the manifest), and with `dump_ir`
writes a readable graph after every pass (`000_captured.txt`, `001_<pass>.txt`, ...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vdopt.capture import export_step
from vdopt.errors import PassError
from vdopt.program import StepProgram


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[..., StepProgram]
    doc: str
    requires: tuple[str, ...] = ()
    guarantees: tuple[str, ...] = ()
    optional: bool = False  # lowering prep: skipped (not an error) when its requirements do not hold


FACTS: dict[str, Callable[[StepProgram], bool]] = {
    "guidance": lambda p: p.guidance,
    "no_guidance": lambda p: not p.guidance,
    "blocks_found": lambda p: any(p.descriptor.is_block(fqn) for fqn in module_paths(p.ep)),
}


def module_paths(ep: torch.export.ExportedProgram) -> set[str]:
    return {fqn for node in ep.graph.nodes for fqn, _ in (node.meta.get("nn_module_stack") or {}).values()}


def fact(program: StepProgram, name: str) -> bool:
    if name in FACTS:
        return FACTS[name](program)
    return name in program.extras.get("guarantees", ())


def rewrite_graph(program: StepProgram, rewrite: Callable[[torch.fx.GraphModule], bool]) -> StepProgram:
    """Applies an FX rewrite to the program's unlifted graph and re-exports it.

    `rewrite` edits the GraphModule in place and returns whether it changed anything. Re-export
    keeps `nn_module_stack` and recomputes every node's shapes, so a rewrite never has to.
    """
    with program.tracing():
        module = program.ep.module()
        if not rewrite(module):
            return program
        module.graph.eliminate_dead_code()
        module.graph.lint()
        module.recompile()
        return program.replace(ep=export_step(module, program.example_inputs, program.dims, program.descriptor, len(program.state)))


def readable_graph(program: StepProgram) -> str:
    return program.ep.graph_module.print_readable(print_output=False, include_stride=False, include_device=False)


def call_function_count(program: StepProgram) -> int:
    return sum(1 for node in program.ep.graph.nodes if node.op == "call_function")


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
            unmet = [name for name in spec.requires if not fact(program, name)]
            if unmet and spec.optional:
                self.log(f"{spec.name}: skipped (needs {', '.join(unmet)})")
                continue
            if unmet:
                raise PassError(f"pass '{spec.name}' requires {', '.join(unmet)}, which the program does not have "
                                f"(passes before it: {', '.join(r['name'] for r in program.passes) or 'none'}).")
            nodes_before = call_function_count(program)
            start = time.perf_counter()
            try:
                result = spec.run(program, **params)
            except TypeError as exc:
                raise PassError(f"pass '{spec.name}': bad parameters {params}: {exc}.") from None
            seconds = time.perf_counter() - start
            guarantees = tuple(dict.fromkeys([*result.extras.get("guarantees", ()), *spec.guarantees]))
            record = {"name": spec.name, "params": params, "seconds": round(seconds, 4),
                      "nodes_before": nodes_before, "nodes_after": call_function_count(result)}
            result = result.replace(passes=(*result.passes, record), extras={**result.extras, "guarantees": guarantees})
            broken = [name for name in spec.guarantees if name in FACTS and not FACTS[name](result)]
            if broken:
                raise PassError(f"pass '{spec.name}' did not establish {', '.join(broken)}.")
            self.log(f"{spec.name}: {seconds * 1000:.1f} ms, {nodes_before} -> {record['nodes_after']} nodes")
            self._dump(index, spec.name, result)
            program = result
        return program
