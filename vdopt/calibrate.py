"""`vdopt calibrate`: find the most aggressive cache setting that stays within a PSNR budget.

Cache thresholds do not transfer across models, step counts or precisions (research note,
caching.md §4.5): a default is either inert or ruinous on a new model. So rather than guess, this
measures. It captures the recipe's step program once, builds the *uncached* bundle (torch backend)
and renders N prompts with fixed seeds as references. Then it searches the policy's knob — the one
parameter that trades quality for skipping, looked up in `KNOBS` — over a grid from conservative to
aggressive, stopping at the first setting that breaks the budget, and bisects between the last
passing and the first failing value. Savings are *counted*, not timed: body evaluations per
(sample, guidance-branch) row, read from the step state `state.computed` through the cache trace.
The winner is the setting with the most body evaluations saved whose mean PSNR against the uncached
output is >= the budget. It writes the input recipe plus the `insert_cache` entry it found.

    vdopt calibrate recipe.yaml model.safetensors --budget psnr=30 --prompts 8 [--policy first_blocks]
                    [--param max_reuse=8 ...] -o calibrated.yaml

A new policy in `insert_cache` plugs in with one `KNOBS` entry (its parameter, its direction, its grid).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from tqdm.auto import tqdm

from vdopt.errors import VdoptError
from vdopt.measure import Budget, PsnrStats, clip_psnr, make_inputs, render
from vdopt.recipe import recipe_with
from vdopt.validate import PROMPT_SET_SEED_LIMIT, check_outputs, check_seed

CALIBRATION_SEED = 1000  # prompt-set seed for calibration; evaluation suites use other seeds


class CalibrationError(VdoptError):
    pass


@dataclass(frozen=True)
class Knob:
    """The parameter calibration searches for a policy.

    `grid` lists candidates from the most conservative to the most aggressive; `aggressive` is +1
    when a larger value skips more (a threshold, an interval) and -1 when a smaller one does.
    """

    param: str
    grid: tuple[float, ...]
    aggressive: int = 1
    integer: bool = False

    def midpoint(self, a: float, b: float) -> float | None:
        """A value strictly between a and b (geometric for positive floats), or None if there is none."""
        if self.integer:
            lo, hi = sorted((int(a), int(b)))
            return (lo + hi) // 2 if hi - lo > 1 else None
        mid = float(f"{math.sqrt(a * b) if a > 0 and b > 0 else (a + b) / 2:.3g}")  # 3 digits: a readable recipe
        return mid if min(a, b) < mid < max(a, b) else None

    def fmt(self, value: float) -> str:
        return str(int(value)) if self.integer else f"{value:.4g}"


THRESHOLDS = (0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0, 1.5)
KNOBS: dict[str, Knob] = {
    "static": Knob("interval", (2, 3, 4, 5, 6, 8, 10, 13, 17), integer=True),
    "first_blocks": Knob("threshold", THRESHOLDS),
    "teacache": Knob("threshold", THRESHOLDS),
    # adacache's codebook bounds times this scale: a larger scale maps a change to a longer reuse
    "adacache": Knob("codebook_scale", (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)),
}


def knob_for(policy: str, param: str | None = None) -> Knob:
    if param is not None:  # a policy not in the table, or a different knob of one that is
        base = KNOBS.get(policy)
        return base if base is not None and base.param == param else Knob(param, THRESHOLDS)
    if policy not in KNOBS:
        raise CalibrationError(f"calibrate does not know which parameter of policy '{policy}' to search; known policies: "
                               f"{', '.join(KNOBS)}. Name it with --search PARAM (searched upward over {list(THRESHOLDS)}), "
                               f"or add the policy to vdopt.calibrate.KNOBS.")
    return KNOBS[policy]


@dataclass
class Trial:
    value: float
    saved: float        # fraction of body evaluations (rows x steps) skipped, from state.computed
    step_saved: float   # fraction of steps on which no row ran the body (what a non-gathering body saves)
    stats: PsnrStats    # over prompts, each clip capped at PSNR_CAP
    ok: bool
    phase: str = "grid"

    @property
    def psnr(self) -> float:
        return self.stats.mean

    def row(self, knob: Knob) -> dict[str, Any]:
        return {knob.param: self.value, "body_evals_saved": round(self.saved, 4), "steps_without_body": round(self.step_saved, 4),
                **self.stats.to_json(), "within_budget": self.ok, "phase": self.phase}


@dataclass
class Calibration:
    policy: str
    knob: Knob
    params: dict[str, Any]          # the insert_cache parameters found (policy included)
    budget: Budget
    best: Trial
    trials: list[Trial] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    seed: int | None = None  # of the prompt set, when it was drawn by count (verify can draw it again)
    recipe_path: Path | None = None

    def table(self) -> str:
        head = f"{self.knob.param:>10} {'body evals saved':>17} {'steps w/o body':>15} {'mean PSNR':>10} {'worst':>7} {'p5':>7}  budget"
        lines = [head, "-" * len(head)]
        for t in sorted(self.trials, key=lambda t: t.value * self.knob.aggressive):
            mark = "ok" if t.ok else "MISS"
            star = "  <- chosen" if t is self.best else ""
            lines.append(f"{self.knob.fmt(t.value):>10} {100 * t.saved:>16.1f}% {100 * t.step_saved:>14.1f}% "
                         f"{t.stats.mean:>10.2f} {t.stats.worst:>7.2f} {t.stats.p5:>7.2f}  {mark}{star}")
        return "\n".join(lines)


# ----- building and running bundles ------------------------------------------------------------

def split_passes(recipe, policy: str, params: dict) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """The recipe's optimisation passes without any insert_cache, split around where insert_cache goes."""
    from vdopt.passes import must_precede

    others = [(p.name, dict(p.params)) for p in recipe.passes if p.name != "insert_cache"]
    before = [p for p in others if must_precede(p[0], "insert_cache")]
    after = [p for p in others if p not in before]
    return before, after


class Bundler:
    """Captures once; writes a torch-backend bundle for any list of passes applied to that capture."""

    def __init__(self, recipe, model_path, workdir: Path, log: Callable[[str], None]):
        from vdopt.capture import capture
        from vdopt.compiler import profiles_of

        self.recipe, self.model_path, self.workdir, self.log = recipe, model_path, workdir, log
        profile = profiles_of(recipe)[0]
        log("capturing the step program" + (f" (profile {profile})" if profile else ""))
        self.program = capture(recipe, model_path, profile=profile)
        self.count = 0

    def build(self, passes: list[tuple[str, dict]]) -> Path:
        from vdopt.compiler import write_bundle
        from vdopt.pass_manager import PassManager
        from vdopt.passes import pipeline

        program = PassManager(pipeline(passes)).run(self.program)
        self.count += 1
        return write_bundle(program, recipe_with(self.recipe, passes), self.workdir / f"candidate_{self.count}.vdopt", self.model_path)


def savings(traces: list[list[dict]], num_steps: int) -> tuple[float, float]:
    rows = sum(len(s["computed"]) for t in traces for s in t)
    if not rows:
        raise CalibrationError("the cached bundle reported no state.computed: is insert_cache in its passes?")
    evals = sum(sum(s["computed"]) for t in traces for s in t)
    steps_with_body = sum(any(s["computed"]) for t in traces for s in t)
    return 1 - evals / rows, 1 - steps_with_body / (num_steps * len(traces))


# ----- the search ------------------------------------------------------------------------------

def search(knob: Knob, candidates: Sequence[float], measure: Callable[[float], tuple[float, float, PsnrStats]],
           budget: Budget, refine: int = 3, policy: str = "?") -> tuple[Trial, list[Trial]]:
    """Grid from conservative to aggressive, stopping at the first miss (PSNR falls as skipping rises),
    then `refine` bisection steps between the most aggressive pass and that miss.

    `measure(value) -> (body evals saved, steps without body, PSNR statistics)`; a trial is within
    `budget` when it meets every bound the budget sets (mean, worst clip, 5th percentile). Returns the
    passing trial that saves the most (ties: higher mean PSNR) and every trial made.
    """
    trials: list[Trial] = []

    def trial(value: float, phase: str) -> Trial:
        saved, step_saved, stats = measure(value)
        trials.append(Trial(value, saved, step_saved, stats, not budget.misses(stats), phase))
        return trials[-1]

    failed: Trial | None = None
    for value in sorted(candidates, key=lambda v: v * knob.aggressive):
        if not trial(value, "grid").ok:
            failed = trials[-1]
            break
        if len(trials) >= 3 and trials[-1].saved > 0 and len({(t.saved, t.psnr) for t in trials[-3:]}) == 1:
            break  # three values, identical decisions: a cap (max_reuse, warmup, final) binds, not the knob
    skipping = [t for t in trials if t.saved > 0]
    if not any(t.ok for t in trials) or (skipping and not any(t.ok for t in skipping)):
        first = skipping[0] if skipping else trials[0]
        raise CalibrationError(
            f"the budget {budget_text(budget)} is unreachable with policy {policy}: even the most conservative "
            f"setting that skips anything, {knob.param}={knob.fmt(first.value)}, gives {first.stats} "
            f"({100 * first.saved:.1f}% body evaluations saved). Lower the budget, give more conservative {knob.param} "
            f"values (--grid), compute more steps (--param warmup=..., final=..., max_reuse=...), or try another policy.")
    if failed is not None:
        lo = max((t for t in trials if t.ok), key=lambda t: t.value * knob.aggressive).value
        hi = failed.value
        for _ in range(refine):
            mid = knob.midpoint(lo, hi)
            if mid is None:
                break
            if trial(mid, "bisect").ok:
                lo = mid
            else:
                hi = mid
    best = max((t for t in trials if t.ok), key=lambda t: (t.saved, t.psnr))
    return best, trials


def budget_text(budget: Budget) -> str:
    return ", ".join(f"{name} {'<=' if name == 'accuracy_drop' else '>='} {value:g}" for name, value in budget.to_json().items())


def calibrate(recipe_path: str | Path, model_path: str | Path | None, budget: Budget | float = 30.0,
              prompts: int | Sequence[str] = 4, policy: str = "first_blocks", out: str | Path | None = None, *,
              params: dict[str, Any] | None = None, search_param: str | None = None, grid: Sequence[float] | None = None,
              refine: int = 3, seed: int = CALIBRATION_SEED, progress: bool = True,
              log: Callable[[str], None] | None = None) -> Calibration:
    """Search `policy`'s knob for the most body evaluations saved within `budget` (a float: mean PSNR >= it).

    `params` fixes the policy's other parameters (warmup, final, max_reuse, first, last, ...);
    `grid` replaces the knob's candidate list (conservative first); `refine` bisection steps follow
    the grid. Writes the calibrated recipe to `out` when given. Raises `CalibrationError` when even
    the most conservative skipping setting misses the budget.
    """
    from vdopt.recipe import load_recipe
    from vdopt.runtime import Session

    log = log or (lambda message: print(f"[calibrate] {message}", file=sys.stderr))
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    budget = budget if isinstance(budget, Budget) else Budget(psnr_mean=float(budget))
    if not budget or budget.accuracy_drop is not None:
        raise CalibrationError("calibrate needs a PSNR budget (psnr=DB, psnr_worst=DB or psnr_p5=DB); accuracy is "
                               "checked by `vdopt compile --verify`, not searched.")
    params = dict(params or {})
    knob = knob_for(policy, search_param)
    if knob.param in params:
        raise CalibrationError(f"'{knob.param}' is the parameter calibration searches for policy {policy}; do not fix it with --param.")
    candidates = [int(v) if knob.integer else float(v) for v in (grid if grid is not None else knob.grid)]
    if not candidates:
        raise CalibrationError("calibrate needs at least one candidate value to try.")
    if isinstance(prompts, int) and prompts < 1:
        raise CalibrationError("calibrate needs at least one prompt (--prompts N, N >= 1).")
    before, after = split_passes(recipe, policy, params)

    with tempfile.TemporaryDirectory(prefix="vdopt-calibrate-") as tmp:
        bundler = Bundler(recipe, model_path, Path(tmp), log)
        log("building the uncached bundle (torch backend)")
        reference = Session(bundler.build(before + after))
        inputs = make_inputs(reference, prompts, seed)
        n = len(inputs.items)
        bar = tqdm(total=n * (1 + len(candidates) + refine), desc="calibrate", unit="clip", disable=not progress)
        bar.set_postfix_str("uncached references")
        refs, _ = render(reference, inputs, bar.update)
        num_steps = reference.num_steps

        def measure(value: float) -> tuple[float, float, PsnrStats]:
            bar.set_postfix_str(f"{knob.param}={knob.fmt(value)}")
            cache = {"policy": policy, **params, knob.param: value}
            try:
                session = Session(bundler.build(before + [("insert_cache", cache)] + after))
            except VdoptError as exc:
                raise CalibrationError(f"insert_cache with {cache} could not be built: {exc}") from exc
            clips, traces = render(session, inputs, bar.update)
            saved, step_saved = savings(traces, num_steps)
            stats = PsnrStats.of(clip_psnr(clips, refs))
            log(f"{knob.param}={knob.fmt(value)}: {100 * saved:.1f}% body evaluations saved, {stats}")
            return saved, step_saved, stats

        try:
            best, trials = search(knob, candidates, measure, budget, refine, policy)
        finally:
            bar.close()
    if best.saved <= 0:
        log(f"no {knob.param} value tried saves any body evaluation within the budget; the recipe will compute every step")
    cache = {"policy": policy, **params, knob.param: best.value}
    result = Calibration(policy, knob, cache, budget, best, trials, inputs.labels, seed if isinstance(prompts, int) else None)
    if out is not None:
        result.recipe_path = write_recipe(recipe_path, cache, out, result)
    return result


def write_recipe(recipe_path: Path, cache: dict[str, Any], out: str | Path, result: Calibration) -> Path:
    """The input recipe (as written, other keys kept) with its insert_cache entry replaced by `cache`."""
    from vdopt.passes import must_precede
    from vdopt.recipe import parse_recipe

    data = yaml.safe_load(Path(recipe_path).read_text())
    passes = [p for p in data.get("passes") or [] if (p if isinstance(p, str) else p.get("name")) != "insert_cache"]
    names = [p if isinstance(p, str) else p.get("name") for p in passes]
    position = next((k for k, name in enumerate(names) if not must_precede(name, "insert_cache")), len(passes))
    passes.insert(position, {"name": "insert_cache", "params": cache})
    data["passes"] = passes
    data.setdefault("verify", {})
    # The compile checks the bundle on the calibration prompts: what calibration measured on the torch
    # backend then holds on any backend, precision or copy of the weights, or the compile says so.
    same_prompts = {"prompts": len(result.prompts), "seed": result.seed} if result.seed is not None else {}
    data["verify"] = {**(data["verify"] or {}), **result.budget.to_json(), **same_prompts}
    parse_recipe(data, str(out))  # never write a recipe that does not validate
    best = result.best
    source = Path(recipe_path).resolve()
    if source.is_relative_to(Path.cwd()):
        source = source.relative_to(Path.cwd())  # a header that does not leak the machine's directories
    header = [
        f"# Calibrated by `vdopt calibrate` from {source}: policy {result.policy}, {result.knob.param}={result.knob.fmt(best.value)}",
        f"# on {len(result.prompts)} calibration prompt(s): {100 * best.saved:.1f}% body evaluations saved "
        f"({100 * best.step_saved:.1f}% of steps ran no body), {best.stats} vs uncached "
        f"(budget {budget_text(result.budget)}).",
    ]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False))
    return out


# ----- command line ----------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    value = yaml.safe_load(text)
    return value if isinstance(value, (int, float, bool, str)) else text


BUDGET_NAMES = {"psnr": "psnr_mean", "psnr_mean": "psnr_mean", "psnr_worst": "psnr_worst", "psnr_p5": "psnr_p5"}


def parse_budget(text: str) -> Budget:
    """`psnr=30` (mean), `psnr_worst=25`, `psnr_p5=27`, comma-separated: each a lower bound in dB."""
    bounds = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        key = BUDGET_NAMES.get(name.strip().lower())
        if key is None or not value:
            raise CalibrationError(f"--budget '{text}': calibrate knows psnr=DB (mean), psnr_worst=DB and psnr_p5=DB, "
                                   f"comma-separated (e.g. --budget psnr=30,psnr_worst=26).")
        try:
            bound = float(value)
        except ValueError:
            raise CalibrationError(f"--budget '{text}': '{value}' is not a number of dB.") from None
        if not math.isfinite(bound) or bound <= 0:
            raise CalibrationError(f"--budget '{text}': a PSNR bound is a positive number of dB, not {value}.")
        bounds[key] = bound
    return Budget(**bounds)


def parse_grid(text: str | None) -> list[float] | None:
    """`--grid 0.05,0.1,0.2`: finite numbers, most conservative first."""
    if text is None:
        return None
    try:
        grid = [float(v) for v in text.split(",")]
    except ValueError:
        raise CalibrationError(f"--grid '{text}': expected comma-separated numbers, e.g. --grid 0.05,0.1,0.2.") from None
    if not all(math.isfinite(v) for v in grid):
        raise CalibrationError(f"--grid '{text}': candidate values must be finite numbers.")
    return grid


def parse_params(items: list[str]) -> dict[str, Any]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CalibrationError(f"--param '{item}': expected NAME=VALUE, e.g. --param max_reuse=8.")
        params[key.strip()] = parse_value(value)
    return params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    p.add_argument("model", nargs="?", help="checkpoint as for `vdopt compile`; omitted: random weights (for trying it out only)")
    p.add_argument("--budget", default="psnr=30", help="quality budget vs the uncached output: psnr=DB (mean), psnr_worst=DB, psnr_p5=DB, comma-separated "
                                                   "(default psnr=30)")
    p.add_argument("--prompts", type=int, default=4, help="number of calibration prompts, rendered with fixed seeds (default 4)")
    p.add_argument("--policy", default="first_blocks", help=f"insert_cache policy ({', '.join(KNOBS)})")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="fix another insert_cache parameter (repeatable)")
    p.add_argument("--search", metavar="PARAM", help="the parameter to search, for a policy calibrate does not know yet")
    p.add_argument("--grid", metavar="V1,V2,...", help="candidate values, most conservative first")
    p.add_argument("--refine", type=int, default=3, help="bisection steps after the grid (default 3)")
    p.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="seed of the calibration prompt set")
    p.add_argument("-o", "--output", required=True, help="calibrated recipe to write")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="also write the trials, the choice and the command as JSON")
    p.add_argument("--quiet", action="store_true")


def run_args(args: argparse.Namespace) -> int:
    check_seed(args.seed, limit=PROMPT_SET_SEED_LIMIT)
    check_outputs(("-o", args.output), ("--json", args.json_path))
    grid = parse_grid(args.grid)
    result = calibrate(args.recipe, args.model, parse_budget(args.budget), args.prompts, args.policy, args.output,
                       params=parse_params(args.param), search_param=args.search, grid=grid, refine=args.refine, seed=args.seed,
                       progress=not args.quiet, log=(lambda m: None) if args.quiet else None)
    print(result.table())
    print(f"wrote {result.recipe_path}: insert_cache {result.params}")
    if args.json_path:
        write_json(result, args, args.json_path)
        print(f"wrote {args.json_path}")
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The `vdopt calibrate` command that `args` stand for (every option spelled out, defaults included)."""
    import shlex

    words = ["vdopt", "calibrate", args.recipe, *([args.model] if args.model else []), "--budget", args.budget,
             "--prompts", str(args.prompts), "--policy", args.policy]
    words += [w for item in args.param for w in ("--param", item)]
    words += (["--search", args.search] if args.search else []) + (["--grid", args.grid] if args.grid else [])
    words += ["--refine", str(args.refine), "--seed", str(args.seed), "-o", args.output, "--json", args.json_path]
    return shlex.join(words)


def write_json(result: Calibration, args: argparse.Namespace, path: str | Path) -> Path:
    """The calibration as a results file: the command, the budget, the prompts, every trial, the choice."""
    import json

    record = {
        "command": command_line(args),
        "recipe": args.recipe, "model": args.model, "policy": result.policy, "knob": result.knob.param,
        "budget": result.budget.to_json(), "seed": args.seed, "prompts": result.prompts,
        "params": result.params, "chosen": result.best.row(result.knob),
        "trials": [t.row(result.knob) for t in sorted(result.trials, key=lambda t: t.value * result.knob.aggressive)],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="search a cache policy's threshold for the most skipping within a PSNR budget")
    add_arguments(p)
    p.set_defaults(func=run_args)


def main(argv: list[str] | None = None) -> int:
    from vdopt.cli import standalone

    return standalone("calibrate", __doc__.splitlines()[0], add_arguments, run_args, argv)


if __name__ == "__main__":
    sys.exit(main())
