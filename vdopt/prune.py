"""`vdopt prune`: choose which temporal blocks a model keeps for a latency or quality budget, measured on the recipe's
own backend and shape (SnapGen-V's search, made honest for the target).

1. **Latency table**: a generation's step time on the recipe's backend with every prunable block, and with each one
   removed alone, in interleaved rounds; a block's cost is the difference of the medians (the worst round beside it).
2. **Sensitivity table**: per block, the clips of the program without it against the unpruned program's on the same
   prompts and seeds: PSNR (mean, worst clip, 5th percentile) and, for the reference model, the evaluation
   classifier's attribute accuracy and the object-track direction accuracy (temporal blocks carry the motion).
3. **Search**: every subset of the candidates when there are at most `EXHAUSTIVE_MAX` (quality measured for each
   subset the latency budget admits, latency predicted from the table), else greedy on PSNR lost per millisecond
   saved. The chosen set is then lowered and timed against the unpruned program side by side, so the reported
   saving is measured, not predicted.

The output is the input recipe with a `prune_temporal` pass (in the order the passes' facts require) and both tables
under `measured.prune`, which compile copies into the bundle's manifest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from vdopt.errors import VdoptError
from vdopt.measure import PsnrStats, clip_psnr, make_inputs, render
from vdopt.validate import check_outputs

EXHAUSTIVE_MAX = 4
PRUNE_SEED = 3000  # the prompt set prune measures quality on (calibrate uses its own; eval's sets are elsewhere)


class PruneError(VdoptError):
    pass


@dataclass(frozen=True)
class Target:
    """`latency=0.7`: the pruned step takes at most 0.7x the unpruned one, losing the least quality; `psnr=28`: mean
    PSNR against the unpruned clips stays >= 28 dB (`accuracy=3`: all-attribute accuracy drops <= 3 points), saving
    the most time."""

    latency: float | None = None
    psnr: float | None = None
    accuracy: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Target":
        values = {}
        for item in text.split(","):
            name, _, value = item.partition("=")
            name = name.strip().lower()
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if name not in ("latency", "psnr", "accuracy") or not math.isfinite(number) or number <= 0:
                raise PruneError(f"--budget '{text}': give latency=FRACTION (0 < f < 1), psnr=DB or accuracy=POINTS, "
                                 f"comma-separated (e.g. --budget latency=0.7).")
            values[name] = number
        target = cls(**values)
        if target.latency is not None and target.latency >= 1:
            raise PruneError(f"--budget latency={target.latency:g}: a fraction of the unpruned step time below 1.")
        if target.latency is not None and (target.psnr or target.accuracy):
            raise PruneError("--budget: give a latency budget (lose the least quality within it) or a quality budget "
                             "(save the most time within it), not both.")
        return target


@dataclass
class Quality:
    psnr: PsnrStats
    accuracy: dict[str, float] | None = None  # percent, the evaluation classifier's (reference model only)
    track_direction: float | None = None      # percent of clips whose object track moves the prompt's way

    def to_json(self) -> dict[str, Any]:
        return {**self.psnr.to_json(), **({"accuracy": self.accuracy} if self.accuracy else {}),
                **({"track_direction": self.track_direction} if self.track_direction is not None else {})}


@dataclass
class Row:
    block: str
    kind: str
    cost_ms: float
    cost_worst_ms: float
    quality: Quality

    def to_json(self) -> dict[str, Any]:
        return {"block": self.block, "kind": self.kind, "cost_ms": round(self.cost_ms, 3),
                "cost_worst_ms": round(self.cost_worst_ms, 3), **self.quality.to_json()}


@dataclass
class Choice:
    blocks: list[str]
    predicted_ms: float
    quality: Quality
    measured_ms: float | None = None
    unpruned_ms: float | None = None
    trials: list[dict] = field(default_factory=list)


class Variants:
    """Captures once (with the recipe's passes that must run before pruning already applied) and writes a bundle for
    any set of pruned blocks on any backend."""

    def __init__(self, recipe, model_path, workdir: Path, log: Callable[[str], None]):
        from vdopt.capture import capture
        from vdopt.compiler import profiles_of
        from vdopt.pass_manager import PassManager
        from vdopt.passes import load_pass, must_precede

        self.recipe, self.model_path, self.workdir = recipe, model_path, workdir
        self.before = [(p.name, dict(p.params)) for p in recipe.passes if must_precede(p.name, "prune_temporal")]
        log("capturing the step program" + (f" and applying {', '.join(n for n, _ in self.before)}" if self.before else ""))
        program = capture(recipe, model_path, profile=profiles_of(recipe)[0])
        self.program = PassManager([(load_pass(name), params) for name, params in self.before]).run(program)
        self.count = 0

    def bundle(self, pruned: dict[str, list[str]], backend: str) -> Path:
        from vdopt.compiler import write_bundle
        from vdopt.pass_manager import PassManager
        from vdopt.passes import load_pass, pipeline
        from vdopt.recipe import recipe_with

        prune = [("prune_temporal", {"blocks": blocks, "what": what}) for what, blocks in pruned.items() if blocks]
        steps = [(load_pass(name), params) for name, params in prune] + pipeline([])
        program = PassManager(steps).run(self.program)
        self.count += 1
        return write_bundle(program, recipe_with(self.recipe, self.before + prune, backend),
                            self.workdir / f"variant_{self.count}.vdopt", self.model_path)


def step_times(sessions: dict[str, Any], inputs, rounds: int) -> dict[str, list[float]]:
    """Milliseconds per step of each session's generation, interleaved: every round runs every session once on the
    same prompt and seed (after one warm-up run each)."""
    _, cond, uncond, seed = inputs.items[0]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for round_ in range(rounds + 1):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(cond, uncond, seed=seed, progress=False)
            if round_:
                times[name].append(1000 * (time.perf_counter() - start) / session.num_steps)
    return times


def measure_quality(session, inputs, reference_clips) -> Quality:
    clips, _ = render(session, inputs)
    stats = PsnrStats.of(clip_psnr(clips, reference_clips))
    if not inputs.pixel_space:
        return Quality(stats)
    from vdopt.eval.metrics import attrs_of_prompts, temporal_consistency
    from vdopt.measure import attribute_accuracy

    directions = attrs_of_prompts(inputs.labels)[:, 2]
    tracks = temporal_consistency(torch.cat(clips), directions)
    return Quality(stats, attribute_accuracy(clips, inputs.labels), round(100 * tracks["track_direction_accuracy"], 2))


def accuracy_drop(quality: Quality, unpruned: Quality) -> float:
    return unpruned.accuracy["all"] - quality.accuracy["all"] if quality.accuracy and unpruned.accuracy else 0.0


def meets(quality: Quality, unpruned: Quality, target: Target) -> bool:
    return ((target.psnr is None or quality.psnr.mean >= target.psnr)
            and (target.accuracy is None or accuracy_drop(quality, unpruned) <= target.accuracy))


def search(rows: list[Row], full_ms: float, target: Target, quality_of: Callable[[list[str]], Quality],
           unpruned: Quality, log: Callable[[str], None]) -> Choice:
    """The set to prune: within a latency budget the one that keeps mean PSNR highest, within a quality budget the one
    that saves the most predicted time. Exhaustive over subsets of up to EXHAUSTIVE_MAX candidates, else greedy."""
    costs = {row.block: row.cost_ms for row in rows}
    trials: list[dict] = []

    def trial(blocks: list[str]) -> Choice:
        quality = quality_of(blocks)
        predicted = full_ms - sum(costs[b] for b in blocks)
        trials.append({"blocks": blocks, "predicted_ms": round(predicted, 3), **quality.to_json()})
        log(f"  {', '.join('.'.join(b.split('.')[-2:]) for b in blocks)}: predicted "
            f"{predicted:.2f} ms/step, {quality.psnr}")
        return Choice(blocks, predicted, quality)

    if target.latency is not None:
        allowed = target.latency * full_ms
        if len(rows) <= EXHAUSTIVE_MAX:
            subsets = [list(s) for k in range(1, len(rows) + 1) for s in itertools.combinations([r.block for r in rows], k)
                       if full_ms - sum(costs[b] for b in s) <= allowed]
            if not subsets:
                raise PruneError(f"no set of the candidate blocks brings the step to {target.latency:g}x: removing all "
                                 f"of them saves {sum(costs.values()):.2f} of {full_ms:.2f} ms.")
            measured = [trial(s) for s in subsets]
            best = max(measured, key=lambda c: (c.quality.psnr.mean, -c.predicted_ms))
        else:
            chosen: list[str] = []
            for row in sorted(rows, key=lambda r: (60 - min(r.quality.psnr.mean, 60)) / max(r.cost_ms, 1e-6)):
                if full_ms - sum(costs[b] for b in chosen) <= allowed:
                    break
                chosen.append(row.block)
            if full_ms - sum(costs[b] for b in chosen) > allowed:
                raise PruneError(f"removing every candidate block saves {sum(costs.values()):.2f} of {full_ms:.2f} ms: "
                                 f"the step cannot reach {target.latency:g}x by pruning these blocks.")
            best = trial(chosen)
    else:
        if len(rows) <= EXHAUSTIVE_MAX:
            subsets = sorted((list(s) for k in range(1, len(rows) + 1) for s in itertools.combinations([r.block for r in rows], k)),
                             key=lambda s: -sum(costs[b] for b in s))
            passing = [c for c in (trial(s) for s in subsets) if meets(c.quality, unpruned, target)]
        else:
            passing, chosen = [], []
            for row in sorted(rows, key=lambda r: (60 - min(r.quality.psnr.mean, 60)) / max(r.cost_ms, 1e-6)):
                candidate = trial([*chosen, row.block])
                if meets(candidate.quality, unpruned, target):
                    chosen = candidate.blocks
                    passing.append(candidate)
        if not passing:
            raise PruneError("no candidate block can be removed within the quality budget (see the sensitivity table).")
        best = max(passing, key=lambda c: (full_ms - c.predicted_ms, c.quality.psnr.mean))
    best.trials = trials
    return best


def table(rows: list[Row], full_ms: float, unpruned: Quality) -> str:
    lines = [f"unpruned: {full_ms:.2f} ms/step" + (f", accuracy {unpruned.accuracy}, track direction "
                                                   f"{unpruned.track_direction:.1f} %" if unpruned.accuracy else ""),
             f"{'block':<40} {'kind':<9} {'cost ms':>8} {'worst':>7} {'share':>6} {'PSNR':>7} {'worst':>7} "
             f"{'shape':>6} {'dir':>6} {'track':>6}"]
    for row in rows:
        q = row.quality
        accuracy = (f"{q.accuracy['shape']:>6.1f} {q.accuracy['direction']:>6.1f} {q.track_direction:>6.1f}"
                    if q.accuracy else "")
        lines.append(f"{row.block:<40} {row.kind:<9} {row.cost_ms:>8.3f} {row.cost_worst_ms:>7.3f} "
                     f"{100 * row.cost_ms / full_ms:>5.1f}% {q.psnr.mean:>7.2f} {q.psnr.worst:>7.2f} {accuracy}")
    return "\n".join(lines)


def prune(recipe_path: str | Path, model_path, target: Target, *, what: str = "temporal", contrast: bool = False,
          prompts: int = 8, rounds: int = 5, seed: int = PRUNE_SEED, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measures both tables, searches, and returns the record (tables, choice, measured saving)."""
    from vdopt.passes.prune_temporal import prunable_blocks
    from vdopt.recipe import load_recipe
    from vdopt.runtime import Session

    log = log or (lambda message: print(f"[vdopt prune] {message}", file=sys.stderr))
    recipe = load_recipe(recipe_path)
    if any(p.name == "prune_temporal" for p in recipe.passes):
        raise PruneError(f"{recipe_path} already prunes blocks; give the recipe without its prune_temporal pass.")
    backend = recipe.lower.backend
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vdopt-prune-") as tmp:
        variants = Variants(recipe, model_path, Path(tmp), log)
        shape = [int(size) for size in variants.program.example_inputs[0].shape]
        shape[0] = 1  # timed and rendered one prompt per call
        kinds = [what] + (["blocks" if what == "temporal" else "temporal"] if contrast else [])
        blocks = {kind: prunable_blocks(variants.program, kind) for kind in kinds
                  if kind == what or variants.program.descriptor.temporal_block_pattern is not None}
        log(f"lowering the unpruned program and {sum(map(len, blocks.values()))} single-block variants on {backend}")
        timed = {"unpruned": Session(variants.bundle({}, backend))}
        quality_bundles = {"unpruned": timed["unpruned"] if backend == "torch" else Session(variants.bundle({}, "torch"))}
        for kind, names in blocks.items():
            for name in names:
                timed[name] = Session(variants.bundle({kind: [name]}, backend))
                quality_bundles[name] = timed[name] if backend == "torch" else Session(variants.bundle({kind: [name]}, "torch"))
        inputs = make_inputs(quality_bundles["unpruned"], prompts, seed)
        log(f"timing {len(timed)} programs, {rounds} interleaved rounds")
        times = step_times(timed, inputs, rounds)
        full_ms = statistics.median(times["unpruned"])
        log(f"rendering {prompts} prompts through {len(quality_bundles)} programs (torch backend)")
        reference_clips, _ = render(quality_bundles["unpruned"], inputs)
        unpruned = measure_quality(quality_bundles["unpruned"], inputs, reference_clips)
        rows = []
        for kind, names in blocks.items():
            for name in names:
                deltas = [u - p for u, p in zip(times["unpruned"], times[name])]
                rows.append(Row(name, kind, full_ms - statistics.median(times[name]), min(deltas),
                                measure_quality(quality_bundles[name], inputs, reference_clips)))
        print(table(rows, full_ms, unpruned))
        candidates = [row for row in rows if row.kind == what]

        def quality_of(chosen: list[str]) -> Quality:
            return measure_quality(Session(variants.bundle({what: chosen}, "torch")), inputs, reference_clips)

        log("searching")
        choice = search(candidates, full_ms, target, quality_of, unpruned, log)
        final = Session(variants.bundle({what: choice.blocks}, backend))
        both = step_times({"unpruned": timed["unpruned"], "pruned": final}, inputs, rounds)
        choice.unpruned_ms, choice.measured_ms = statistics.median(both["unpruned"]), statistics.median(both["pruned"])
        ratios = [u / p for u, p in zip(both["unpruned"], both["pruned"])]
    return {
        "recipe": str(recipe_path), "model": str(model_path) if model_path else None, "backend": backend,
        "shape": dict(zip(("batch", "channels", "frames", "height", "width"), shape)),
        "budget": {k: v for k, v in target.__dict__.items() if v is not None}, "what": what, "prompts": prompts, "seed": seed,
        "rounds": rounds, "unpruned": {"ms_per_step": round(full_ms, 3), **unpruned.to_json()},
        "latency_and_sensitivity": [row.to_json() for row in rows],
        "chosen": {"blocks": choice.blocks, "predicted_ms": round(choice.predicted_ms, 3), **choice.quality.to_json(),
                   "measured_ms": round(choice.measured_ms, 3), "unpruned_ms_same_run": round(choice.unpruned_ms, 3),
                   "speedup_median": round(choice.unpruned_ms / choice.measured_ms, 3),
                   "speedup_worst_round": round(min(ratios), 3)},
        "trials": choice.trials, "load_average": {"start": load_start, "end": os.getloadavg()},
    }


def write_recipe(recipe_path: str | Path, record: dict[str, Any], output: str | Path) -> Path:
    """The input recipe (as written, other keys kept) with prune_temporal placed where the passes' facts require
    and the tables under measured.prune."""
    from vdopt.passes import must_precede
    from vdopt.recipe import parse_recipe

    data = yaml.safe_load(Path(recipe_path).read_text())
    passes = list(data.get("passes") or [])
    names = [p if isinstance(p, str) else p.get("name") for p in passes]
    position = next((k for k, name in enumerate(names) if not must_precede(name, "prune_temporal")), len(passes))
    passes.insert(position, {"name": "prune_temporal", "params": {"blocks": record["chosen"]["blocks"], "what": record["what"]}})
    data["passes"] = passes
    data["measured"] = {**(data.get("measured") or {}), "prune": record}
    parse_recipe(data, str(output))
    chosen = record["chosen"]
    header = (f"# vdopt prune {record['recipe']}: {', '.join(chosen['blocks'])} removed on {record['backend']}: "
              f"{chosen['measured_ms']:.2f} against {chosen['unpruned_ms_same_run']:.2f} ms/step measured side by side "
              f"({chosen['speedup_median']:.2f}x median, worst round {chosen['speedup_worst_round']:.2f}x); mean PSNR "
              f"{chosen['psnr_mean']:.2f} dB vs unpruned (worst clip {chosen['psnr_worst']:.2f} dB) on {record['prompts']} "
              f"prompts. Tables under measured.prune.\n")
    Path(output).write_text(header + yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False))  # no YAML aliases
    return Path(output)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    p.add_argument("model", nargs="?", help="checkpoint as for `vdopt compile`; omitted: random weights (for trying it out only)")
    p.add_argument("--budget", default="latency=0.7", help="latency=FRACTION of the unpruned step time (keep the most "
                                                          "quality), or psnr=DB / accuracy=POINTS (save the most time); "
                                                          "default latency=0.7")
    p.add_argument("--what", default="temporal", choices=("temporal", "blocks"),
                   help="the descriptor's temporal blocks (default) or its main blocks")
    p.add_argument("--contrast", action="store_true", help="also measure the other kind of block (not searched)")
    p.add_argument("--prompts", type=int, default=8, help="prompts the quality is measured on (default 8)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--seed", type=int, default=PRUNE_SEED, help="seed of the prompt set")
    p.add_argument("-o", "--output", required=True, help="pruned recipe to write")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="also write the tables and the choice as JSON")


def run_args(args: argparse.Namespace) -> int:
    if args.prompts < 1 or args.rounds < 1:
        raise PruneError("--prompts and --rounds must be at least 1.")
    check_outputs(("-o", args.output), ("--json", args.json_path))
    record = prune(args.recipe, args.model, Target.parse(args.budget), what=args.what, contrast=args.contrast,
                   prompts=args.prompts, rounds=args.rounds, seed=args.seed)
    record["command"] = " ".join(["vdopt", "prune", *getattr(args, "argv", [])]) or None
    chosen = record["chosen"]
    print(f"chosen: {', '.join(chosen['blocks'])}: {chosen['measured_ms']:.2f} vs {chosen['unpruned_ms_same_run']:.2f} "
          f"ms/step ({chosen['speedup_median']:.2f}x, worst round {chosen['speedup_worst_round']:.2f}x), mean PSNR "
          f"{chosen['psnr_mean']:.2f} dB vs unpruned")
    print(f"wrote {write_recipe(args.recipe, record, args.output)}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json_path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="measure each temporal block's latency and quality cost and choose the blocks to "
                                            "remove for a budget")
    add_arguments(p)
    p.set_defaults(func=run_args)
