"""Step reduction on the reference model: the 50-step guided teacher against the 4-step student, side by side.

Compiles both bundles with the same backend (the teacher from `recipes/reference.yaml`, the student
from its `reduce_steps` recipe), then times a whole generation (every step, from noise to clip) of
each in interleaved rounds, teacher first in every round, on the same prompt and seed, so both see the
same machine state. Prints network evaluations per clip, seconds per clip and the ratio;
writes JSON.

    python bench/steps.py [--student-recipe recipes/student_reference.yaml]
        [--teacher vdopt/reference/weights/teacher.safetensors] [--configs aoti:1,aoti:4,onnx:1,onnx:4]
        [--rounds 10] [--note "..."] [--json bench/results/steps.json]

Each `--configs` entry BACKEND:N compiles both bundles for that backend and N clips per generation
(N different prompts) and reports seconds per clip (a generation's time / N): at N > 1 throughput,
where fixed per-call costs weigh less. Per entry: median, mean and worst seconds per clip, and the
teacher / student ratio of medians beside the mean and the worst of the per-round ratios. All
entries go into one JSON file.
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
from vdopt.recipe import Recipe, load_recipe, parse_recipe, recipe_with
from vdopt.runtime import Session

ROOT = Path(__file__).resolve().parent.parent
TEACHER_RECIPE = ROOT / "recipes" / "reference.yaml"
TEACHER_WEIGHTS = ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"


def with_batch(recipe: Recipe, batch: int) -> Recipe:
    """The recipe compiled for exactly `batch` prompts per call (validated: batch becomes a range)."""
    data = recipe.model_dump(mode="json")
    data["model"]["input"]["batch"] = batch
    return parse_recipe(data, "<derived recipe>")


def guided(recipe: Recipe) -> bool:
    return recipe.sampler.guidance_scale != 1.0


def evaluations_per_clip(recipe: Recipe) -> int:
    """Network evaluations (batch rows through the denoiser) of one clip: guidance doubles them."""
    return recipe.sampler.steps * (2 if guided(recipe) else 1)


def parse_configs(text: str) -> list[tuple[str, int]]:
    """`aoti:1,onnx:4` -> [("aoti", 1), ("onnx", 4)]: backend and clips per generation."""
    configs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        backend, _, batch = item.partition(":")
        configs.append((backend, int(batch or 1)))
    return configs


def measure(args, backend: str, batch: int, tmp: Path) -> dict:
    """One backend and batch: compile both bundles, time interleaved generations, teacher first in every round."""
    recipes = {"teacher": with_batch(recipe_with(load_recipe(args.teacher_recipe), backend=backend), batch),
               "student": with_batch(recipe_with(load_recipe(args.student_recipe), backend=backend), batch)}
    prompts, seeds, _ = suite.prompt_set(max(args.rounds, 1) * batch, seed=0)
    samples: dict[str, list[float]] = {name: [] for name in recipes}
    sessions, compile_seconds = {}, {}
    for name, recipe in recipes.items():
        start = time.perf_counter()
        path = tmp / f"{name}_{backend}_{batch}.vdopt"
        compile_bundle(recipe, args.teacher, path)
        compile_seconds[name] = round(time.perf_counter() - start, 1)
        print(f"compiled {name} ({recipe.sampler.steps} steps, guidance {recipe.sampler.guidance_scale:g}, "
              f"{backend}, batch {batch}) in {compile_seconds[name]:.1f} s", flush=True)
        sessions[name] = Session(path)
    encoders = {name: session.prompt_encoder() for name, session in sessions.items()}

    def generate(name: str, k: int) -> float:
        """Seconds per clip of one generation of prompts k * batch ... (k + 1) * batch - 1."""
        cond, uncond = encoders[name](" | ".join(prompts[k * batch:(k + 1) * batch]))
        start = time.perf_counter()
        sessions[name].run(cond, uncond if guided(recipes[name]) else None, seed=int(seeds[k]), progress=False)
        return (time.perf_counter() - start) / batch

    load_start = os.getloadavg()
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
                   "compile_seconds": compile_seconds[name],
                   "seconds_median": round(statistics.median(samples[name]), 4),
                   "seconds_mean": round(statistics.mean(samples[name]), 4),
                   "seconds_worst": round(max(samples[name]), 4),
                   "seconds": [round(t, 4) for t in samples[name]]} for name in recipes}
    result = {"backend": backend, "batch": batch, "rows": rows,
              "speedup": round(teacher_s / student_s, 3),  # ratio of medians
              "speedup_per_round_median": round(statistics.median(per_round), 3),
              "speedup_per_round_mean": round(statistics.mean(per_round), 3),
              "speedup_worst_round": round(min(per_round), 3),
              "speedup_per_round": [round(v, 3) for v in per_round],
              "evaluation_ratio": evaluations_per_clip(recipes["teacher"]) / evaluations_per_clip(recipes["student"]),
              "load_average_start": load_start, "load_average_end": os.getloadavg()}
    print(f"\nwhole generation of {batch} 8x32x32 clip(s), per clip, {backend}, {args.rounds} interleaved rounds")
    print(f"{'program':<8} {'steps':>5} {'guidance':>8} {'evals/clip':>10} {'median s':>9} {'mean s':>8} {'worst s':>8}")
    for name, row in rows.items():
        print(f"{name:<8} {row['steps']:>5} {row['guidance_scale']:>8g} {row['evaluations_per_clip']:>10} "
              f"{row['seconds_median']:>9.4f} {row['seconds_mean']:>8.4f} {row['seconds_worst']:>8.4f}")
    print(f"teacher / student wall clock: {result['speedup']:.1f}x (ratio of medians; per-round mean "
          f"{result['speedup_per_round_mean']:.1f}x, worst round {result['speedup_worst_round']:.1f}x; "
          f"{result['evaluation_ratio']:.0f}x fewer evaluations)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(TEACHER_WEIGHTS), help="teacher checkpoint")
    parser.add_argument("--teacher-recipe", default=str(TEACHER_RECIPE))
    parser.add_argument("--student-recipe", default=str(ROOT / "recipes" / "student_reference.yaml"),
                        help="a recipe applying a student with reduce_steps (default: the shipped one; vdopt distill writes OUT/recipe.yaml)")
    parser.add_argument("--configs", default="aoti:1,aoti:4,onnx:1,onnx:4",
                        help="BACKEND:BATCH,... one measurement each (default: aoti and onnx, 1 and 4 clips per generation)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. that the machine was shared)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "steps.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    command = "python bench/steps.py " + " ".join(
        f"--{k.replace('_', '-')} {json.dumps(v) if k == 'note' else v}" for k, v in vars(args).items()
        if k in ("configs", "rounds", "warmup", "threads", "note") and v not in ("", None)) \
        + ("" if Path(args.json).resolve() == (ROOT / "bench" / "results" / "steps.json") else f" --json {args.json}")
    configs = []
    with tempfile.TemporaryDirectory(prefix="vdopt-bench-steps-") as tmp:
        for backend, batch in parse_configs(args.configs):
            configs.append(measure(args, backend, batch, Path(tmp)))

    result = {"command": command, "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "note": args.note,
              "rounds": args.rounds, "warmup": args.warmup,
              "teacher_recipe": relative(args.teacher_recipe), "student_recipe": relative(args.student_recipe),
              "teacher": relative(args.teacher), "configs": configs}
    print("\nteacher / student wall clock per clip (ratio of medians; worst round)")
    for c in configs:
        print(f"  {c['backend']:<6} batch {c['batch']}: {c['speedup']:.1f}x; worst round {c['speedup_worst_round']:.1f}x")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def relative(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


if __name__ == "__main__":
    main()
