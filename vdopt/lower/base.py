"""What every backend provides: lower a step program to files, and load those files to run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from vdopt.errors import LoweringError
from vdopt.module_stack import module_stack
from vdopt.program import StepProgram

Runner = Callable[..., Sequence[torch.Tensor]]


class Backend(Protocol):
    name: str
    needs_op_library: bool  # whether a program calling vdopt's custom ops needs their library to run (shipped in the bundle)
    splits_conditionals: bool  # whether `lower.split_conditionals: auto` cuts the step at its conditional for it
    runtime: dict  # how its files are run (threads, session options, compiler settings), recorded in the manifest

    def lower(self, program: StepProgram, directory: Path, stem: str) -> list[str]:
        """Writes the segment's files under `directory`; returns their names relative to it."""

    def load(self, directory: Path, files: list[str], device: str, profile: bool = False) -> Runner:
        """Returns `run(*inputs) -> outputs` over flat tensors in the manifest's order. `profile`: a runner
        whose work `vdopt profile` can attribute to module paths, if the backend needs a different one for that.
        A backend whose files are tied to the machine that built them (TensorRT engines) also has
        `build_info() -> dict`, recorded in the segment's `build` and passed back to `load(..., build=...)`."""


def node_origin(node: torch.fx.Node) -> str:
    stack = module_stack(node)
    if not stack:
        return "the step program itself"
    fqn, cls_name = stack[-1]
    return f"module '{fqn}' ({cls_name})"


def unsupported_op_error(backend: str, ep: torch.export.ExportedProgram, op_text: str, detail: str) -> LoweringError:
    """A lowering failure that names the op and the module it came from."""
    for node in ep.graph.nodes:
        if node.op == "call_function" and str(node.target).split(".default")[0] in op_text:
            return LoweringError(
                f"The {backend} backend cannot lower op '{node.target}' from {node_origin(node)}: {detail}. Choose "
                f"another backend for this model (lower.backend), or give the op a decomposition."
            )
    return LoweringError(f"The {backend} backend failed to lower the step program: {detail}.")
