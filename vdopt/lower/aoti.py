"""`aoti`: the step program compiled ahead of time by AOTInductor into a `.pt2` package.

The package runs from Python (`aoti_load_package`) or C++ (`AOTIModelPackageLoader`) without
the Python model code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vdopt.errors import first_line
from vdopt.lower.base import unsupported_op_error
from vdopt.program import StepProgram
from vdopt.safety import check_zip_members


class AotiBackend:
    name = "aoti"
    splits_conditionals = False  # runs `torch.cond` lazily

    def lower(self, program: StepProgram, directory: Path, stem: str) -> list[str]:
        name = f"{stem}.aoti.pt2"
        try:
            torch._inductor.aoti_compile_and_package(program.ep, package_path=str(directory / name))
        except Exception as exc:  # noqa: BLE001 - inductor raises many types; report the op and module
            raise unsupported_op_error(self.name, program.ep, str(exc), first_line(exc)) from exc
        return [name]

    def load(self, directory: Path, files: list[str], device: str):
        # The package holds native code: the Session has verified its checksum; its members are checked
        # here before AOTInductor extracts them (no absolute paths, `..` or symlinks: zip-slip).
        package = directory / files[0]
        check_zip_members(package, "AOTInductor package")
        runner = torch._inductor.aoti_load_package(str(package))

        def run(*inputs):
            with torch.no_grad():
                return runner(*inputs)

        return run
