"""vdopt's passes, one file each, and the order they run in.

`OPTIMIZATION_PASSES` are the ones a recipe names in `passes:` (they change what the program
computes, within a quality budget); `LOWERING_PREP_PASSES` run after them, in this order, on every
compile (they keep the numbers and make the graph easier for backends).
"""

from __future__ import annotations

import dataclasses
import importlib

from vdopt.errors import PassError
from vdopt.pass_manager import Pass

OPTIMIZATION_PASSES: tuple[str, ...] = ("reduce_steps", "insert_cache")
LOWERING_PREP_PASSES: tuple[str, ...] = ("fold_guidance_batch",)


def load_pass(name: str) -> Pass:
    if name not in OPTIMIZATION_PASSES + LOWERING_PREP_PASSES:
        known = ", ".join(OPTIMIZATION_PASSES + LOWERING_PREP_PASSES)
        raise PassError(f"pass '{name}' is not known; known passes: {known}.")
    module = importlib.import_module(f"vdopt.passes.{name}")
    return module.PASS


def pipeline(recipe_passes: list[tuple[str, dict]]) -> list[tuple[Pass, dict]]:
    """The recipe's passes in its order, then the lowering-prep passes in theirs."""
    named = [(load_pass(name), params) for name, params in recipe_passes]
    order = [OPTIMIZATION_PASSES.index(name) for name, _ in recipe_passes if name in OPTIMIZATION_PASSES]
    if order != sorted(order):
        raise PassError(f"recipe passes must keep this order: {', '.join(OPTIMIZATION_PASSES)} (each rewrites what the "
                        f"next one expects to find).")
    prep = [(dataclasses.replace(load_pass(name), optional=True), {}) for name in LOWERING_PREP_PASSES
            if name not in {n for n, _ in recipe_passes}]
    return named + prep
