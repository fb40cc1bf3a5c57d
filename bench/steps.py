"""Step reduction on the reference model: the 50-step guided teacher against the 4-step student, side by side.

Compiles both bundles with the same backend (the teacher from `recipes/reference.yaml`, the student
from its `reduce_steps` recipe), then times a whole generation (every step, from noise to clip) of
each in interleaved rounds, teacher first in every round, on the same prompt and seed, so both see the
same machine state. Prints network evaluations per clip, median seconds per clip and the ratio;
writes JSON.

    python bench/steps.py [--student-recipe recipes/student_reference.yaml]
        [--teacher vdopt/reference/weights/teacher.safetensors] [--backend aoti] [--rounds 10]
        [--batch 1] [--json bench/results/steps.json]

`--batch N` compiles both bundles for N clips per generation (N different prompts) and reports
seconds per clip (a generation's time / N): throughput, where fixed per-call costs weigh less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vdopt.compiler import compile_bundle
from vdopt.eval import suite
from vdopt.recipe import Recipe, load_recipe
from vdopt.runtime import Session

ROOT = Path(__file__).resolve().parent.parent
TEACHER_RECIPE = ROOT / "recipes" / "reference.yaml"
TEACHER_WEIGHTS = ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"


def with_backend(recipe: Recipe, backend: str) -> Recipe:
    return recipe.model_copy(update={"lower": recipe.lower.model_copy(update={"backend": backend})})


def with_batch(recipe: Recipe, batch: int) -> Recipe:
    model = recipe.model.model_copy(update={"input": recipe.model.input.model_copy(update={"batch": batch})})
    return recipe.model_copy(update={"model": model})


def guided(recipe: Recipe) -> bool:
    return recipe.sampler.guidance_scale != 1.0


def evaluations_per_clip(recipe: Recipe) -> int:
    """Network evaluations (batch rows through the denoiser) of one clip: guidance doubles them."""
    return recipe.sampler.steps * (2 if guided(recipe) else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(TEACHER_WEIGHTS), help="teacher checkpoint")
    parser.add_argument("--teacher-recipe", default=str(TEACHER_RECIPE))
    parser.add_argument("--student-recipe", default=str(ROOT / "recipes" / "student_reference.yaml"),
                        help="a recipe applying a student with reduce_steps (default: the shipped one; vdopt distill writes OUT/recipe.yaml)")
    parser.add_argument("--backend", default="aoti", help="one backend for both bundles (torch, aoti, onnx; default aoti, the recipes' own)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=1, help="clips per generation (different prompts)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "steps.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    recipes = {"teacher": with_batch(with_backend(load_recipe(args.teacher_recipe), args.backend), args.batch),
               "student": with_batch(with_backend(load_recipe(args.student_recipe), args.backend), args.batch)}
    prompts, seeds, _ = suite.prompt_set(max(args.rounds, 1) * args.batch, seed=0)
    samples: dict[str, list[float]] = {name: [] for name in recipes}
    with tempfile.TemporaryDirectory(prefix="vdopt-bench-steps-") as tmp:
        sessions = {}
        for name, recipe in recipes.items():
            start = time.perf_counter()
            path = Path(tmp) / f"{name}.vdopt"
            compile_bundle(recipe, args.teacher, path)
            print(f"compiled {name} ({recipe.sampler.steps} steps, guidance {recipe.sampler.guidance_scale:g}, "
                  f"{args.backend}) in {time.perf_counter() - start:.1f} s")
            sessions[name] = Session(path)
        encoders = {name: session.prompt_encoder() for name, session in sessions.items()}

        def generate(name: str, k: int) -> float:
            """Seconds per clip of one generation of prompts k * batch ... (k + 1) * batch - 1."""
            cond, uncond = encoders[name](" | ".join(prompts[k * args.batch:(k + 1) * args.batch]))
            start = time.perf_counter()
            sessions[name].run(cond, uncond if guided(recipes[name]) else None,
                               seed=int(seeds[k]), progress=False)
            return (time.perf_counter() - start) / args.batch

        for r in range(args.warmup + args.rounds):
            k = r % max(args.rounds, 1)
            for name in recipes:  # teacher first in every round
                seconds = generate(name, k)
                if r >= args.warmup:
                    samples[name].append(seconds)

    teacher_s, student_s = (statistics.median(samples[n]) for n in ("teacher", "student"))
    per_round = [t / s for t, s in zip(samples["teacher"], samples["student"])]
    rows = {name: {"steps": recipes[name].sampler.steps, "guidance_scale": recipes[name].sampler.guidance_scale,
                   "evaluations_per_clip": evaluations_per_clip(recipes[name]),
                   "seconds_median": round(statistics.median(samples[name]), 4),
                   "seconds": [round(t, 4) for t in samples[name]]} for name in recipes}
    result = {"backend": args.backend, "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
              "rounds": args.rounds, "batch": args.batch, "rows": rows, "speedup": round(teacher_s / student_s, 3),
              "speedup_per_round_median": round(statistics.median(per_round), 3),
              "evaluation_ratio": evaluations_per_clip(recipes["teacher"]) / evaluations_per_clip(recipes["student"])}
    print(f"\nwhole generation of {args.batch} 8x32x32 clip(s), per clip, {args.backend}, median of {args.rounds} interleaved rounds")
    print(f"{'program':<8} {'steps':>5} {'guidance':>8} {'evals/clip':>10} {'s/clip':>8}")
    for name, row in rows.items():
        print(f"{name:<8} {row['steps']:>5} {row['guidance_scale']:>8g} {row['evaluations_per_clip']:>10} {row['seconds_median']:>8.3f}")
    print(f"teacher / student wall clock: {result['speedup']:.1f}x (per-round median {result['speedup_per_round_median']:.1f}x; "
          f"{result['evaluation_ratio']:.0f}x fewer evaluations)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
