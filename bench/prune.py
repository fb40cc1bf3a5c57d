"""Temporal-layer pruning on the reference model: the shipped pruned 4-step student against the unpruned shipped
student, side by side, with an ablation row (the same blocks pruned, no recovery training).

Compiles the three bundles on one backend, times whole generations (4 steps, one clip) in interleaved rounds (every
round runs every bundle on the same prompt and seed), and evaluates each over the same clips with the evaluation
suite (shape / colour / direction accuracy, FVD-MS, PSNR against the 50-step guided teacher). Prints the table and
the issue's bars, writes JSON.

    python bench/prune.py [--backend aoti] [--prompts 256] [--rounds 10] [--cache out/evcache]
        [--json bench/results/prune.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from flops import forward_flops
from results_file import write_results
from vdopt.compiler import compile_program, write_bundle
from vdopt.eval import suite
from vdopt.program import StepProgram
from vdopt.eval.cli import cached, generate_from_bundle, generator_for
from vdopt.recipe import load_recipe, parse_recipe, recipe_with
from vdopt.runtime import Session

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"
STUDENT = ROOT / "recipes" / "student_reference.yaml"
PRUNED = ROOT / "recipes" / "pruned_student_reference.yaml"


def recipes(backend: str) -> dict:
    """student, pruned without recovery (the student's weights, the pruned recipe's blocks), pruned with recovery."""
    student, pruned = load_recipe(STUDENT), load_recipe(PRUNED)
    ablation = student.model_dump(mode="json")
    ablation["passes"] = [*ablation["passes"], *({"name": p.name, "params": dict(p.params)} for p in pruned.passes
                                                 if p.name == "prune_temporal")]
    return {"student": recipe_with(student, backend=backend),
            "pruned, no recovery": recipe_with(parse_recipe(ablation, "ablation"), backend=backend),
            "pruned + recovery (shipped)": recipe_with(pruned, backend=backend)}


def flops_per_step(program: StepProgram) -> int:
    """Network FLOPs (matmuls and attention) of one step for one clip, counted on the compiled step program: what
    removing blocks can save at most, whatever the backend's fixed costs."""
    return forward_flops(program.module(), *program.example_inputs) // program.example_inputs[0].shape[0]


def time_rounds(sessions: dict[str, Session], rounds: int) -> dict[str, list[float]]:
    prompts, seeds, _ = suite.prompt_set(rounds, seed=0)
    encoders = {name: s.prompt_encoder() for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(rounds + 1):  # round 0 warms up
        for name, session in sessions.items():
            cond, _ = encoders[name](prompts[r % rounds])
            start = time.perf_counter()
            session.run(cond, seed=int(seeds[r % rounds]), progress=False)
            if r:
                times[name].append(1000 * (time.perf_counter() - start) / session.num_steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="aoti")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="evaluation prompt set")
    parser.add_argument("--cache", default=str(ROOT / "out" / "evcache"), help="clip cache (the teacher's clips are reused)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "prune.json"))
    args = parser.parse_args()
    os.chdir(ROOT)  # the recipes name their weights relative to the repository root

    sessions, compile_seconds, flops = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="vdopt-bench-prune-") as tmp:
        for k, (name, recipe) in enumerate(recipes(args.backend).items()):
            start = time.perf_counter()
            program = compile_program(recipe, TEACHER)
            write_bundle(program, recipe, Path(tmp) / f"{k}.vdopt", TEACHER)
            compile_seconds[name] = round(time.perf_counter() - start, 1)
            flops[name] = flops_per_step(program)
            sessions[name] = Session(Path(tmp) / f"{k}.vdopt")
            print(f"compiled {name} on {args.backend} in {compile_seconds[name]} s", flush=True)
        load_start = os.getloadavg()
        times = time_rounds(sessions, args.rounds)
        load_end = os.getloadavg()
        reference, _, reference_label = generator_for("teacher", 50, None, "cpu")
        reference = cached(reference, reference_label, args.cache)
        rows = {}
        for k, (name, session) in enumerate(sessions.items()):
            result = suite.evaluate(generate_from_bundle(Path(tmp) / f"{k}.vdopt"), args.prompts, args.seed,
                                    reference_fn=reference, label=name, reference_label="teacher@50steps", progress=False)
            rows[name] = {"ms_per_step_median": round(statistics.median(times[name]), 3),
                          "ms_per_step_worst": round(max(times[name]), 3),
                          "ms_per_step": [round(t, 3) for t in times[name]], "compile_seconds": compile_seconds[name],
                          "parameters": session.manifest["parameters"], "mflops_per_step": round(flops[name] / 1e6, 1),
                          **{key: result["all"][key] for key in ("accuracy", "fvd_ms", "temporal", "vs_reference")}}
            print(f"evaluated {name}: {suite.summary_lines(result)[2]}", flush=True)

    student, pruned = rows["student"], rows["pruned + recovery (shipped)"]
    per_round = [s / p for s, p in zip(student["ms_per_step"], pruned["ms_per_step"])]
    speedup = student["ms_per_step_median"] / pruned["ms_per_step_median"]
    flops_ratio = student["mflops_per_step"] / pruned["mflops_per_step"]
    bars = {
        "step time >= 1.3x lower": speedup >= 1.3,
        "shape >= student - 3": pruned["accuracy"]["shape"] >= student["accuracy"]["shape"] - 0.03,
        "direction >= student - 2": pruned["accuracy"]["direction"] >= student["accuracy"]["direction"] - 0.02,
        "FVD-MS <= 1.15x student": pruned["fvd_ms"] <= 1.15 * student["fvd_ms"],
    }
    print(f"\n{args.prompts} clips (eval seed {args.seed}), {args.backend}, {args.rounds} interleaved rounds of one clip")
    print(f"{'program':<30} {'params':>8} {'MFLOP':>7} {'ms/step':>8} {'worst':>7} {'shape':>6} {'colour':>6} {'dir':>6} {'FVD-MS':>7} {'PSNR':>6}")
    for name, row in rows.items():
        accuracy = row["accuracy"]
        print(f"{name:<30} {row['parameters']:>8} {row['mflops_per_step']:>7.1f} {row['ms_per_step_median']:>8.2f} {row['ms_per_step_worst']:>7.2f} "
              f"{100 * accuracy['shape']:>6.1f} {100 * accuracy['colour']:>6.1f} {100 * accuracy['direction']:>6.1f} "
              f"{row['fvd_ms']:>7.1f} {row['vs_reference']['psnr_db']:>6.2f}")
    print(f"student / pruned step time: {speedup:.2f}x (ratio of medians; worst round {min(per_round):.2f}x); "
          f"FLOPs per step: {flops_ratio:.3f}x")
    for bar, ok in bars.items():
        print(f"  {'met' if ok else 'MISSED'}: {bar}")
    write_results(args.json, {"backend": args.backend, "prompts": args.prompts, "seed": args.seed, "rounds": args.rounds,
                              "rows": rows, "speedup_median": round(speedup, 3), "flops_ratio": round(flops_ratio, 3), "speedup_worst_round": round(min(per_round), 3),
                              "speedup_per_round": [round(v, 3) for v in per_round], "bars": bars,
                              "pruned_recipe": yaml.safe_load(PRUNED.read_text()).get("passes")}, load_start, load_end)

if __name__ == "__main__":
    main()
