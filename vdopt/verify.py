"""`vdopt compile --verify`: quality is part of the build (ARCHITECTURE contract 8).

A recipe's `verify:` section states a budget: lower bounds on PSNR against the unoptimised program
(the same recipe with no passes, on the torch backend: what the user would get without vdopt) for the
mean, the worst clip and the 5th percentile, and for the reference family an upper bound on the
attribute accuracy lost, judged by the evaluation classifier. The compiler renders the same prompts and
seeds through both, records the measurement in the manifest (`vdopt inspect` shows it) and refuses to
write a bundle that misses a bound: a cache tuned on one model, step count or precision is otherwise
silently ruinous on another.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from vdopt.errors import VdoptError
from vdopt.measure import PsnrStats, attribute_accuracy, clip_psnr, make_inputs, render
from vdopt.program import StepProgram
from vdopt.recipe import Recipe, recipe_with


class VerifyError(VdoptError):
    pass


def unoptimised_bundle(captured: StepProgram, recipe: Recipe, model_path, directory: Path) -> Path:
    """The captured program with no recipe passes (lowering prep only), as a torch-backend bundle."""
    from vdopt.compiler import run_passes, write_bundle

    plain = recipe_with(recipe, [], "torch")
    return write_bundle(run_passes(captured, plain), plain, directory / "unoptimised.vdopt", model_path)


def measure(bundle: Path, unoptimised: Path, prompts: int, seed: int, progress: bool = True) -> dict[str, Any]:
    """Renders `prompts` prompts with fixed seeds through both bundles and compares the clips."""
    from vdopt.runtime import Session

    candidate, reference = Session(bundle), Session(unoptimised)
    inputs = make_inputs(reference, prompts, seed)
    with tqdm(total=2 * len(inputs.items), desc="verify", unit="clip", disable=not progress, leave=False) as bar:
        refs, _ = render(reference, inputs, bar.update)
        clips, _ = render(candidate, inputs, bar.update)
    report: dict[str, Any] = {"prompts": len(inputs.items), "seed": seed, **PsnrStats.of(clip_psnr(clips, refs)).to_json(),
                              "accuracy": None}
    if inputs.pixel_space:
        report["accuracy"] = {"unoptimised": attribute_accuracy(refs, inputs.labels), "bundle": attribute_accuracy(clips, inputs.labels)}
    return report


def accuracy_drop(report: dict[str, Any]) -> float | None:
    accuracy = report["accuracy"]
    return None if accuracy is None else accuracy["unoptimised"]["all"] - accuracy["bundle"]["all"]


def summary(report: dict[str, Any]) -> str:
    """A `verify` record in words: the PSNR statistics and, where measured, both accuracies."""
    accuracy = report["accuracy"]
    return str(PsnrStats.from_json(report)) + ("" if accuracy is None else
        f"; attribute accuracy {accuracy['bundle']['all']:.1f} % vs {accuracy['unoptimised']['all']:.1f} % unoptimised")


def verify_bundle(bundle: Path, captured: StepProgram, recipe: Recipe, model_path, *, progress: bool = True,
                  log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Measures `bundle` against the unoptimised program; returns the manifest's `verify` record, or raises
    `VerifyError` with the numbers when the recipe's budget is missed."""
    budget = recipe.verify.budget()
    if budget.accuracy_drop is not None and captured.descriptor.family != "reference":
        raise VerifyError(f"verify.accuracy_drop: attribute accuracy is measured by the evaluation classifier, which knows the "
                          f"reference family only, not {captured.descriptor.family}; bound PSNR instead.")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vdopt-verify-") as tmp:
        log("verify: building the unoptimised program (no passes, torch backend)")
        unoptimised = unoptimised_bundle(captured, recipe, model_path, Path(tmp))
        log(f"verify: rendering {recipe.verify.prompts} prompt(s) through both")
        report = measure(bundle, unoptimised, recipe.verify.prompts, recipe.verify.seed, progress)
    missed = budget.misses(PsnrStats.from_json(report), accuracy_drop(report))
    report.update(budget=budget.to_json(), passed=not missed, seconds=round(time.perf_counter() - start, 2))
    log(f"verify: {summary(report)}")
    if missed:
        raise VerifyError(
            f"the bundle misses its quality budget ({'; '.join(missed)}), measured on {report['prompts']} prompt(s) "
            f"against the unoptimised program: {summary(report)}. No bundle was written. Make the passes less aggressive "
            f"(`vdopt calibrate` finds a cache setting within a budget) or loosen the recipe's verify: section.")
    return report
