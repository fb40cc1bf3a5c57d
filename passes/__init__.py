"""vdopt's passes, one file each, and the order they run in.

`OPTIMIZATION_PASSES` are the ones a recipe names in `passes:` (they change what the program
computes, within a quality budget); `LOWERING_PREP_PASSES` run after them, in this order, on every
compile (they keep the numbers and make the graph easier for backends).

The order of a recipe's passes follows from what each declares: a pass that `invalidates` a fact a
later pass `requires` must come after it (insert_cache ends `uncached`, which prune_temporal and
reduce_steps require, and fuse_norm_modulate, which fuses the body before it is cached; prune_temporal ends
`unpruned`, which reduce_steps requires).
"""

from __future__ import annotations

import dataclasses

from vdopt.errors import PassError
from vdopt.pass_manager import Pass
from vdopt.passes.fold_guidance_batch import PASS as FOLD_GUIDANCE_BATCH
from vdopt.passes.fuse_norm_modulate import PASS as FUSE_NORM_MODULATE
from vdopt.passes.insert_cache import PASS as INSERT_CACHE
from vdopt.passes.prune_temporal import PASS as PRUNE_TEMPORAL
from vdopt.passes.reduce_steps import PASS as REDUCE_STEPS
from vdopt.passes.rewrite_content_motion import PASS as REWRITE_CONTENT_MOTION

OPTIMIZATION_PASSES: dict[str, Pass] = {p.name: p for p in (REWRITE_CONTENT_MOTION, REDUCE_STEPS, PRUNE_TEMPORAL, FUSE_NORM_MODULATE, INSERT_CACHE)}
LOWERING_PREP_PASSES: dict[str, Pass] = {p.name: p for p in (FOLD_GUIDANCE_BATCH,)}
PASSES: dict[str, Pass] = {**OPTIMIZATION_PASSES, **LOWERING_PREP_PASSES}


def load_pass(name: str) -> Pass:
    if name not in PASSES:
        raise PassError(f"pass '{name}' is not known; known passes: {', '.join(PASSES)}.")
    return PASSES[name]


def ended_facts(first: str, then: str) -> set[str]:
    """The facts pass `first` requires that pass `then` ends."""
    return set(load_pass(then).invalidates) & set(load_pass(first).requires)


def must_precede(first: str, then: str) -> bool:
    """Whether pass `first` must run before pass `then`: `then` ends a fact `first` requires."""
    return bool(ended_facts(first, then))


def check_order(names: list[str]) -> None:
    """Refuses a pass listed after one that ends a fact it requires, naming the fact."""
    for position, name in enumerate(names):
        for earlier in names[:position]:
            ended = ended_facts(name, earlier)
            if ended:
                raise PassError(f"recipe passes: {name} must come before {earlier}: it requires {', '.join(sorted(ended))}, "
                                f"which {earlier} ends.")


def pipeline(recipe_passes: list[tuple[str, dict]]) -> list[tuple[Pass, dict]]:
    """The recipe's passes in its order, then the lowering-prep passes in theirs."""
    named = [(load_pass(name), params) for name, params in recipe_passes]
    check_order([name for name, _ in recipe_passes])
    prep = [(dataclasses.replace(spec, optional=True), {}) for name, spec in LOWERING_PREP_PASSES.items()
            if name not in {n for n, _ in recipe_passes}]
    return named + prep
