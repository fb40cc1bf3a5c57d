"""`aoti`: the step program compiled ahead of time by AOTInductor into a `.pt2` package.

The package runs from Python (`aoti_load_package`) or C++ (`AOTIModelPackageLoader`) without
the Python model code.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import fx

from vdopt.errors import BundleError, first_line
from vdopt.lower.base import unsupported_op_error
from vdopt.program import StepProgram
from vdopt.safety import check_zip_members


@contextmanager
def cond_operands_keep_traced_strides():
    """Makes Inductor hand every `torch.cond` operand to the branches with the strides it was traced with.

    Inductor compiles each branch for the operands' traced strides but lays an operand out in the outer
    graph as it likes: Latte's temporal blocks see `[rows * tokens, frames, dim]` values that Inductor
    keeps frame-major (strides `(64, 8192, 1)` where the trace had `(512, 64, 1)`), and the branch then
    reads the wrong elements. The shipped cached recipe's clips were 14 dB from the torch backend's.
    Upstream fixed the same for branch outputs (pytorch/pytorch#169963), not operands: this requires
    each operand's traced strides, as `Conditional.create` does for the outputs.
    """
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    create = ir.Conditional.__dict__["create"]

    def with_traced_strides(cls, predicate, true_fn, false_fn, operands):
        traced = V.graph.current_node.args[-1]
        operands = [ir.ExternKernel.require_exact_strides(operand, node.meta["val"].stride())
                    if isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor) else operand
                    for operand, node in zip(operands, traced)]
        return create.__func__(cls, predicate, true_fn, false_fn, operands)

    ir.Conditional.create = classmethod(with_traced_strides)
    try:
        yield
    finally:
        ir.Conditional.create = create


class AotiBackend:
    name = "aoti"
    splits_conditionals = False  # runs `torch.cond` lazily

    def lower(self, program: StepProgram, directory: Path, stem: str) -> list[str]:
        name = f"{stem}.aoti.pt2"
        try:
            with cond_operands_keep_traced_strides():
                torch._inductor.aoti_compile_and_package(program.ep, package_path=str(directory / name))
        except Exception as exc:  # noqa: BLE001 - inductor raises many types; report the op and module
            raise unsupported_op_error(self.name, program.ep, str(exc), first_line(exc)) from exc
        return [name]

    def load(self, directory: Path, files: list[str], device: str):
        # The package holds native code: the Session has verified its checksum; its members are checked
        # here before AOTInductor extracts them (no absolute paths, `..` or symlinks: zip-slip).
        package = directory / files[0]
        check_zip_members(package, "AOTInductor package")
        try:
            runner = torch._inductor.aoti_load_package(str(package))
        except RuntimeError as exc:  # not an AOTInductor package (another archive, or the manifest's backend was edited)
            raise BundleError(f"{package}: not a loadable AOTInductor package ({first_line(exc)}); the file or the "
                              f"manifest's backend was edited. Recompile the bundle.") from None

        def run(*inputs):
            with torch.no_grad():
                return runner(*inputs)

        return run
