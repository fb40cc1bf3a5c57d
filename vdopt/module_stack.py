"""Where a graph node came from: the module path (and class) torch.export records in `nn_module_stack`.

Passes find blocks through it, error messages name the module of a failing op, and `vdopt profile`
attributes time to module paths. One reader of the metadata, so they all agree on what it says.
"""

from __future__ import annotations

from torch import fx

STEP_PROGRAM = ""  # the path of nodes outside every module: the step module's own code (guidance, sampler, cache)


def class_name(cls) -> str:
    """`cls` as torch.export keeps it (a class, or its qualified name after save/load), without its module."""
    name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return name.rsplit(".", 1)[-1]


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(module path, class name) of every module the node was traced in, outermost first."""
    return [(path, class_name(cls)) for path, cls in (node.meta.get("nn_module_stack") or {}).values()]


def module_path(node: fx.Node) -> str:
    """The innermost module the node was traced in; STEP_PROGRAM outside every module."""
    paths = [path for path, _ in module_stack(node) if path]
    return paths[-1] if paths else STEP_PROGRAM

