"""`torch`: the step program saved as a `torch.export` `.pt2`, run by PyTorch eagerly."""

from __future__ import annotations

from pathlib import Path

import torch

from torch import fx

from vdopt.errors import BundleError
from vdopt.module_stack import module_path
from vdopt.program import StepProgram, dtype_name
from vdopt.safety import load_exported_program


def finite(bound) -> int | None:
    """A range bound as an int; None for torch's integer infinity (`int_oo`, whose `is_finite` is not False)."""
    try:
        return int(bound)
    except (OverflowError, TypeError, AttributeError):
        return None


def input_signature(ep: torch.export.ExportedProgram) -> list[tuple[torch.dtype, list[tuple[int, int | None]]]]:
    """(dtype, [(min, max) per dim]) of each user input of `ep`, from its traced values and range constraints."""
    user = set(ep.graph_signature.user_inputs)
    signature = []
    for node in ep.graph.nodes:
        value = node.meta.get("val")
        if node.op != "placeholder" or node.name not in user or not isinstance(value, torch.Tensor):
            continue
        dims = []
        for size in value.shape:
            if isinstance(size, int):
                dims.append((size, size))
                continue
            bounds = ep.range_constraints.get(size.node.expr)
            low = finite(bounds.lower) if bounds is not None else None
            dims.append((low or 0, finite(bounds.upper) if bounds is not None else None))
        signature.append((value.dtype, dims))
    return signature


def check_inputs(path: Path, signature: list, inputs: tuple) -> None:
    """The run's inputs (built from the manifest) against what the program was exported for, so a manifest
    that does not describe its program is one message, not a guard failure inside torch.export."""
    def shown(dtype, dims) -> str:
        sizes = [str(lo) if lo == hi else f"{lo}..{'' if hi is None else hi}" for lo, hi in dims]
        return f"{dtype_name(dtype)} [{', '.join(sizes)}]"

    problem = None
    if len(inputs) != len(signature):
        problem = f"it takes {len(signature)} inputs and the manifest describes {len(inputs)}"
    for k, ((dtype, dims), tensor) in enumerate(zip(signature, inputs)):
        if problem is None and (tensor.dtype != dtype or tensor.dim() != len(dims) or any(
                size < lo or (hi is not None and size > hi) for size, (lo, hi) in zip(tensor.shape, dims))):
            problem = f"its input {k} is {shown(dtype, dims)} and the manifest gives {dtype_name(tensor.dtype)} {list(tensor.shape)}"
    if problem:
        raise BundleError(f"{path}: the step program does not match the manifest: {problem}. The manifest was edited "
                          f"after the bundle was written; recompile the bundle.")


MODULE_RANGE = "vdopt/module "  # + module path: the profiler range around a run of one module's ops
RANGE_ENTER = torch.ops.profiler._record_function_enter_new.default
RANGE_EXIT = torch.ops.profiler._record_function_exit._RecordFunction


def add_module_ranges(graph: fx.Graph) -> None:
    """Wraps each run of consecutive ops traced in the same module in a profiler range named by its path,
    so a profile attributes op time to modules (the ops of the step module itself get the empty path)."""
    handle, current = None, None
    for node in list(graph.nodes):
        if node.op == "output" or (node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor)):
            path = module_path(node) if node.op != "output" else None
            if path == current:
                continue
            with graph.inserting_before(node):
                if handle is not None:
                    graph.call_function(RANGE_EXIT, (handle,))
                handle = graph.call_function(RANGE_ENTER, (MODULE_RANGE + path, None)) if path is not None else None
            current = path


def profiled(module: fx.GraphModule) -> fx.GraphModule:
    """`module` with module ranges in its graph and every subgraph (`torch.cond` branches)."""
    for graph_module in module.modules():
        if isinstance(graph_module, fx.GraphModule):
            add_module_ranges(graph_module.graph)
            graph_module.recompile()
    return module


class TorchBackend:
    name = "torch"
    splits_conditionals = False  # runs `torch.cond` lazily
    needs_op_library = True  # the program calls vdopt's ops through the dispatcher
    runtime = {"threads": "torch.get_num_threads()"}

    def lower(self, program: StepProgram, directory: Path, stem: str) -> list[str]:
        name = f"{stem}.pt2"
        torch.export.save(program.ep, str(directory / name))
        return [name]

    def load(self, directory: Path, files: list[str], device: str, profile: bool = False):
        ep = load_exported_program(directory / files[0])  # unpickles nothing but tensors
        signature = input_signature(ep)
        module = ep.module().to(device)
        if profile:
            module = profiled(module)

        def run(*inputs):
            check_inputs(directory / files[0], signature, inputs)
            with torch.no_grad():
                return module(*inputs)

        return run
