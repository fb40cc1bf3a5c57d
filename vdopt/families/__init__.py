"""Per-family architecture descriptors (see `base.py`). Importing this package registers the built-in ones.

A family outside vdopt comes in one of two ways (docs/adding_a_family.md):

- an entry point in the `vdopt.families` group of an installed distribution
  (`[project.entry-points."vdopt.families"] sana = "my_pkg.families:SANA"`): found by name, loaded on first
  use, like any installed plugin;
- a `module.path:ATTRIBUTE` reference in `model.family`: importing a module named by a recipe or a bundle
  runs its code, so it is loaded only with `trust_code` (`--trust-code`), and then registered under that
  reference for the rest of the process.
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points

from vdopt.errors import CaptureError
from vdopt.families import cogvideox, hunyuan_video, latte, ltx_video, reference, wan  # noqa: F401  (registers)
from vdopt.families.base import ArchitectureDescriptor, register, registry

ENTRY_POINT_GROUP = "vdopt.families"
BUILT_IN = frozenset(registry())
REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def plugin_names() -> list[str]:
    """Names of the installed `vdopt.families` entry points (nothing is imported to list them)."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def known_families() -> list[str]:
    return sorted(set(registry()) | set(plugin_names()))


def is_code_reference(family: str) -> bool:
    return REFERENCE.fullmatch(family) is not None


def checked(value, family: str, origin: str) -> ArchitectureDescriptor:
    if not isinstance(value, ArchitectureDescriptor):
        raise CaptureError(f"model.family '{family}': {origin} is a {type(value).__name__}, not an "
                           f"ArchitectureDescriptor (vdopt.families.base).")
    return register(value, name=family)


def load_family(family: str, *, trust_code: bool = False) -> ArchitectureDescriptor:
    """The descriptor `family` names: a registered family, an installed entry point, or (with `trust_code`) a
    `module.path:ATTRIBUTE` reference."""
    if family in registry():
        return registry()[family]
    if is_code_reference(family):
        if not trust_code:
            raise CaptureError(
                f"model.family '{family}' names Python code: loading it imports {family.split(':')[0]}, which runs that "
                f"module. Pass --trust-code (vdopt compile / run / profile; trust_code=True in Python) if you trust it, "
                f"or install it as a '{ENTRY_POINT_GROUP}' entry point (docs/adding_a_family.md).")
        module_name, attribute = family.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CaptureError(f"model.family '{family}': cannot import {module_name} ({exc}); is it installed or on "
                               f"PYTHONPATH?") from None
        if not hasattr(module, attribute):
            raise CaptureError(f"model.family '{family}': {module_name} has no attribute '{attribute}'.")
        return checked(getattr(module, attribute), family, f"{module_name}.{attribute}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == family:
            try:
                value = ep.load()
            except Exception as exc:  # noqa: BLE001 - a plugin's import can fail in any way; name the plugin
                raise CaptureError(f"model.family '{family}': the '{ENTRY_POINT_GROUP}' entry point {ep.value} of "
                                   f"{ep.dist.name if ep.dist else 'an installed package'} failed to load "
                                   f"({type(exc).__name__}: {exc}).") from None
            return checked(value, family, f"entry point {ep.value}")
    raise CaptureError(f"model.family '{family}' is not known; known families: {', '.join(known_families())}. A family "
                       f"of your own: a '{ENTRY_POINT_GROUP}' entry point or a module.path:ATTRIBUTE reference "
                       f"(docs/adding_a_family.md).")


def family_origin(family: str) -> dict[str, str]:
    """How a bundle finds its family again: built in, an entry point (and the distribution that declares it),
    or a code reference."""
    if is_code_reference(family):
        return {"kind": "code_reference", "reference": family}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == family:
            return {"kind": "entry_point", "value": ep.value, "distribution": ep.dist.name if ep.dist else "",
                    "version": ep.dist.version if ep.dist else ""}
    return {"kind": "built_in" if family in BUILT_IN else "registered"}


def descriptor_for(family: str) -> ArchitectureDescriptor:
    """A family already loaded, a built-in one or an installed entry point; a code reference must have been loaded
    with `load_family(..., trust_code=True)` first."""
    return load_family(family)
