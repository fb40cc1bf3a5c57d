"""End to end on the reference model: the 50-step guided eager teacher (the plain diffusers loop a user writes,
`vdopt.reference.sample`) against compiled recipes, side by side, clips per second and the ratio, with the quality
row of each.

Every candidate recipe is compiled on every backend given; all programs (the eager teacher first) are timed in
interleaved rounds of one generation of `--batch` clips each, on the same prompts and seeds, then evaluated over the
same `--prompts` clips (shape / colour / direction accuracy, FVD-MS). The best composed program is the fastest whose
shape accuracy is within 3 points of the teacher's; the project's target is >= 50x. Writes JSON.

    python bench/e2e.py [--recipes recipes/student_reference.yaml,recipes/pruned_student_reference.yaml]
        [--backends aoti,onnx] [--batch 1] [--rounds 10] [--prompts 256] [--cache out/evcache]
        [--json bench/results/e2e.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from results_file import write_results
from vdopt.compiler import compile_bundle
from vdopt.eval import suite
from vdopt.eval.cli import cached, generate_from_bundle, generator_for
from vdopt.recipe import load_recipe, parse_recipe, recipe_with
from vdopt.reference.model import load_reference
from vdopt.reference.sample import sample
from vdopt.runtime import Session

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"
EAGER = "eager teacher, 50 steps, g=3"
TARGET = 50.0
SHAPE_POINTS = 3.0


def with_batch(recipe, batch: int):
    """The recipe taking 1..`batch` prompts per call: timed at `batch`, evaluated one clip at a time."""
    data = recipe.model_dump(mode="json")
    data["model"]["input"]["batch"] = {"min": 1, "max": max(batch, 2)}
    return parse_recipe(data, "<derived recipe>")


def add_run_arguments(parser: argparse.ArgumentParser, rounds: int, results: str) -> None:
    """The timing and quality options every side-by-side reference-model bench takes."""
    parser.add_argument("--batch", type=int, default=1, help="clips per generation, for every program")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--prompts", type=int, default=256, help="clips each quality row is measured on")
    parser.add_argument("--seed", type=int, default=0, help="evaluation prompt set")
    parser.add_argument("--cache", default=str(ROOT / "out" / "evcache"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / results))


def interleaved_rounds(names: list[str], generate, rounds: int) -> tuple[dict[str, list[float]], tuple, tuple]:
    """`generate(name, k)` for every program in each of `rounds` rounds, after a warm-up round: the seconds of each
    call by program, and the load average before and after."""
    seconds: dict[str, list[float]] = {name: [] for name in names}
    load_start = os.getloadavg()
    for r in range(rounds + 1):  # round 0 warms up
        for name in names:
            elapsed = generate(name, r % rounds)
            if r:
                seconds[name].append(elapsed)
    return seconds, load_start, os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="recipes/student_reference.yaml,recipes/pruned_student_reference.yaml")
    parser.add_argument("--backends", default="aoti,onnx")
    add_run_arguments(parser, rounds=10, results="e2e.json")
    args = parser.parse_args()
    os.chdir(ROOT)

    transformer, conditioner = load_reference()
    prompts, seeds, _ = suite.prompt_set(args.rounds * args.batch, seed=0)
    with tempfile.TemporaryDirectory(prefix="vdopt-bench-e2e-") as tmp:
        bundles = {}
        for recipe_path in args.recipes.split(","):
            for backend in args.backends.split(","):
                name = f"{Path(recipe_path).stem} on {backend}"
                path = Path(tmp) / f"{len(bundles)}.vdopt"
                start = time.perf_counter()
                compile_bundle(with_batch(recipe_with(load_recipe(recipe_path), backend=backend), args.batch), TEACHER, path,
                               verify=False)
                print(f"compiled {name} in {time.perf_counter() - start:.1f} s", flush=True)
                bundles[name] = path
        sessions = {name: Session(path) for name, path in bundles.items()}
        encoders = {name: session.prompt_encoder() for name, session in sessions.items()}

        def generate(name: str, k: int) -> float:
            chunk = prompts[k * args.batch:(k + 1) * args.batch]
            start = time.perf_counter()
            if name == EAGER:
                sample(transformer, conditioner, chunk, seed=int(seeds[k]))
            else:
                cond, _ = encoders[name](chunk)
                sessions[name].run(cond, seed=int(seeds[k]), progress=False)
            return time.perf_counter() - start

        names = [EAGER, *sessions]
        seconds, load_start, load_end = interleaved_rounds(names, generate, args.rounds)

        teacher_fn, _, teacher_label = generator_for("teacher", 50, None, "cpu")
        rows = {}
        for name in names:
            generate_fn = cached(teacher_fn, teacher_label, args.cache) if name == EAGER else generate_from_bundle(bundles[name])
            result = suite.evaluate(generate_fn, args.prompts, args.seed, label=name, progress=False)["all"]
            median = statistics.median(seconds[name])
            rows[name] = {"clips_per_second": round(args.batch / median, 3), "seconds_per_generation_median": round(median, 4),
                          "seconds_per_generation_worst": round(max(seconds[name]), 4),
                          "seconds": [round(s, 4) for s in seconds[name]], "accuracy": result["accuracy"],
                          "fvd_ms": result["fvd_ms"], "track_direction_accuracy": result["temporal"]["track_direction_accuracy"]}
            print(f"evaluated {name}: shape {100 * result['accuracy']['shape']:.1f} %, FVD-MS {result['fvd_ms']:.1f}", flush=True)

    teacher = rows[EAGER]
    for name in sessions:
        per_round = [t / s for t, s in zip(seconds[EAGER], seconds[name])]
        rows[name].update(speedup_median=round(teacher["seconds_per_generation_median"] / rows[name]["seconds_per_generation_median"], 2),
                          speedup_worst_round=round(min(per_round), 2),
                          shape_within=100 * (teacher["accuracy"]["shape"] - rows[name]["accuracy"]["shape"]) <= SHAPE_POINTS)
    eligible = [n for n in sessions if rows[n]["shape_within"]]
    best = max(eligible, key=lambda n: rows[n]["clips_per_second"]) if eligible else None
    print(f"\n{args.batch} clip(s) per generation, {args.rounds} interleaved rounds; quality over {args.prompts} clips")
    print(f"{'program':<48} {'clips/s':>8} {'x eager':>8} {'worst':>6} {'shape':>6} {'dir':>6} {'FVD-MS':>7}")
    for name, row in rows.items():
        ratio = f"{row['speedup_median']:>8.1f} {row['speedup_worst_round']:>6.1f}" if name != EAGER else f"{'1.0':>8} {'':>6}"
        print(f"{name + (' (best)' if name == best else ''):<48} {row['clips_per_second']:>8.2f} {ratio} "
              f"{100 * row['accuracy']['shape']:>6.1f} {100 * row['accuracy']['direction']:>6.1f} {row['fvd_ms']:>7.1f}")
    if best:
        met = rows[best]["speedup_median"] >= TARGET
        print(f"best: {best}, {rows[best]['speedup_median']:.1f}x the eager teacher (worst round "
              f"{rows[best]['speedup_worst_round']:.1f}x): the {TARGET:g}x target is {'met' if met else 'NOT met'}")
    write_results(args.json, {"batch": args.batch, "rounds": args.rounds, "prompts": args.prompts, "seed": args.seed,
                              "rows": rows, "best": best, "target": TARGET}, load_start, load_end)

if __name__ == "__main__":
    main()
