"""`torch`: the step program saved as a `torch.export` `.pt2`, run by PyTorch eagerly."""

from __future__ import annotations

from pathlib import Path

import torch

from vdopt.program import StepProgram
from vdopt.safety import load_exported_program


class TorchBackend:
    name = "torch"
    splits_conditionals = False  # runs `torch.cond` lazily

    def lower(self, program: StepProgram, directory: Path, stem: str) -> list[str]:
        name = f"{stem}.pt2"
        torch.export.save(program.ep, str(directory / name))
        return [name]

    def load(self, directory: Path, files: list[str], device: str):
        module = load_exported_program(directory / files[0]).module().to(device)  # unpickles nothing but tensors

        def run(*inputs):
            with torch.no_grad():
                return module(*inputs)

        return run
