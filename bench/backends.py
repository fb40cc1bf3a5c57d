"""Whole clips on each backend against the eager diffusers loop, side by side in one run.

Configs:
- `teacher`: the shipped reference teacher (`recipes/reference.yaml`, real weights
  `vdopt/reference/weights/teacher.safetensors`: a pixel-space Latte, 8 frames of 32x32 RGB, 50
  guided flow-Euler steps);
- `student`: the shipped 4-step student (`recipes/student_reference.yaml`, real weights, no guidance);
- `wide`: the reference architecture at width 512 (8 heads of 64) and patch 2, so a clip is 2048
  tokens, the size of a small video, where compute rather than dispatch dominates (random weights,
  4 guided steps);
- `wide-bf16`: `wide` with `model.dtype: bfloat16`, the eager loop in bfloat16 too (same precision on
  both sides; bench/roofline.py shows why fp32 cannot reach the wide target on this CPU).
The eager baseline is what a user runs today: the same checkpoint in diffusers'
`LatteTransformer3DModel` behind the family's adapter, in a plain guided Euler loop over the same
sigmas, from the same initial noise. Every backend's clip is checked against it (max |diff| goes
into the JSON), then timed in interleaved rounds, eager first in each, so all see the same machine
state. Per backend: median, mean and worst clip time, and the speedup as the ratio of medians, the
mean of the per-round ratios and the worst round. Every runner uses `--threads` torch threads (ONNX
Runtime takes the same count; see `vdopt.lower.onnx_backend.session_options`).

    python bench/backends.py [--configs teacher,student,wide,wide-bf16] [--backends torch,aoti,onnx] [--rounds 5]
        [--threads 1] [--note "..."] [--json bench/results/backends.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, ContextManager

import torch

from vdopt.capture import load_denoiser
from vdopt.compiler import compile_bundle
from vdopt.errors import RecipeError
from vdopt.program import DTYPES
from vdopt.recipe import Recipe, load_recipe, parse_recipe, recipe_with
from vdopt.runtime import Session
from vdopt.sampler import diffusers_scheduler

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "vdopt" / "reference" / "weights"
PROMPT = "red circle moving up-left"
WIDE = {"num_attention_heads": 8, "attention_head_dim": 64, "cross_attention_dim": 512, "patch_size": 2, "num_layers": 1}


def config_recipe(name: str) -> tuple[Recipe, Path | None, Path | None]:
    """The recipe of a config, the checkpoint its bundles compile from, and the one the eager loop loads
    (the student's bundles are the teacher with the recipe's `reduce_steps` pass, which swaps in the
    student's weights; the eager loop loads those weights directly)."""
    if name == "teacher":
        return load_recipe(ROOT / "recipes" / "reference.yaml"), WEIGHTS / "teacher.safetensors", WEIGHTS / "teacher.safetensors"
    if name == "student":
        return load_recipe(ROOT / "recipes" / "student_reference.yaml"), WEIGHTS / "teacher.safetensors", WEIGHTS / "student.safetensors"
    if name in ("wide", "wide-bf16"):
        data = load_recipe(ROOT / "recipes" / "reference.yaml").model_dump(mode="json")
        config = json.loads((WEIGHTS / "config.json").read_text())["transformer"]
        data["model"]["config"] = {**config, **WIDE}
        data["model"]["dtype"] = "bfloat16" if name == "wide-bf16" else "float32"
        data["sampler"]["steps"] = 4
        return parse_recipe(data), None, None
    raise SystemExit(f"unknown config '{name}'; known: teacher, student, wide, wide-bf16")


def distilled_timesteps(recipe: Recipe) -> list[float] | None:
    """The timesteps a `reduce_steps` pass of the recipe samples at, if it has one."""
    return next((p.params["timesteps"] for p in recipe.passes if p.name == "reduce_steps"), None)


def eager_denoiser(recipe: Recipe, weights: Path | None) -> torch.nn.Module:
    """The unoptimised diffusers module behind the family's adapter, as a user loads it."""
    torch.manual_seed(0)  # the wide config's random weights: the same in every bundle (compile_bundle reseeds alike)
    denoiser, _, _ = load_denoiser(recipe, weights)
    return denoiser.eval().to(DTYPES[recipe.model.dtype])


def eager_loop(recipe: Recipe, denoiser: torch.nn.Module, timesteps: list[float] | None = None,
               step_context: Callable[[int, torch.Tensor], ContextManager] | None = None):
    """A plain (guided) flow-Euler loop over `denoiser`, as a user writes it; `step_context(i, t)` wraps
    step i's denoiser call (diffusers' cache hooks need `model.cache_context(...)` there)."""
    scheduler = diffusers_scheduler(recipe.sampler)
    if timesteps is not None:  # the student's distilled schedule: sigma = t / 1000, then 0
        sigmas = torch.tensor([t / 1000 for t in timesteps] + [0.0])
        steps = torch.tensor(timesteps)
    else:
        sigmas, steps = scheduler.sigmas, scheduler.timesteps
    scale = recipe.sampler.guidance_scale
    guided = recipe.sampler.uses_guidance
    step_context = step_context or (lambda i, t: contextlib.nullcontext())

    @torch.no_grad()
    def clip(x, cond, uncond):
        for i in range(len(steps)):
            with step_context(i, steps[i]):
                if guided:
                    out = denoiser(torch.cat([x, x]), steps[i].expand(2 * x.shape[0]), torch.cat([cond, uncond]))
                    out_cond, out_uncond = out.chunk(2)
                    velocity = out_uncond + scale * (out_cond - out_uncond)
                else:
                    velocity = denoiser(x, steps[i].expand(x.shape[0]), cond)
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity
        return x

    return clip


def clip_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_config(name: str, backends: list[str], rounds: int, warmup: int, tmp: Path) -> dict:
    recipe, bundle_weights, eager_weights = config_recipe(name)
    eager = eager_loop(recipe, eager_denoiser(recipe, eager_weights), distilled_timesteps(recipe))
    runners, compile_seconds, sessions, skipped = {}, {}, {}, {}
    for backend in backends:
        try:
            bundle_recipe = recipe_with(recipe, backend=backend)
        except RecipeError as exc:
            skipped[backend] = str(exc)
            print(f"[{name}] {backend} skipped: {exc}", flush=True)
            continue
        path = tmp / f"{name}_{backend}.vdopt"
        torch.manual_seed(0)
        start = time.perf_counter()
        compile_bundle(bundle_recipe, bundle_weights, path, verify=False)
        compile_seconds[backend] = round(time.perf_counter() - start, 1)
        print(f"[{name}] compiled {backend} in {compile_seconds[backend]:.1f} s", flush=True)
        sessions[backend] = Session(path)
    first = next(iter(sessions.values()))
    encoder = first.prompt_encoder()
    if encoder is not None:
        cond, uncond = encoder(PROMPT)
    else:  # random weights ship no prompt encoder: random prompt tokens, zeros for the unconditional branch
        shape = [1 if isinstance(d, str) else d for d in next(s for s in first.inputs if s.name.startswith("cond.")).shape]
        cond = {"encoder_hidden_states": torch.randn(shape, generator=torch.Generator().manual_seed(0))}
        uncond = {"encoder_hidden_states": torch.zeros(shape)}
    if not first.guidance:
        uncond = None
    x = first.initial_noise(0, first.latent_shape(1, None, None, None))
    dtype = DTYPES[recipe.model.dtype]  # the eager loop runs in the recipe's precision too
    cond_t = cond["encoder_hidden_states"].to(dtype)
    uncond_t = uncond["encoder_hidden_states"].to(dtype) if uncond is not None else None
    reference = eager(x, cond_t, uncond_t)
    max_abs_diff = {}
    for backend, session in sessions.items():
        runners[backend] = (lambda s=session: s.run(cond, uncond, seed=0, progress=False))
        max_abs_diff[backend] = float((runners[backend]().float() - reference.float()).abs().max())
        print(f"[{name}] {backend}: max |clip - eager clip| = {max_abs_diff[backend]:.2e}", flush=True)
    runners = {"eager": lambda: eager(x, cond_t, uncond_t), **runners}
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in runners}
    for _ in range(rounds):
        for k, fn in runners.items():  # eager first in every round
            samples[k].append(clip_seconds(fn))
    eager_median = statistics.median(samples["eager"])
    rows = []
    for k, values in samples.items():
        per_round = [e / v for e, v in zip(samples["eager"], values)]
        row = {"backend": k, "clip_s_median": round(statistics.median(values), 4), "clip_s_mean": round(statistics.mean(values), 4),
               "clip_s_worst": round(max(values), 4), "speedup_vs_eager": round(eager_median / statistics.median(values), 3),
               "speedup_vs_eager_mean": round(statistics.mean(per_round), 3),
               "speedup_vs_eager_worst_round": round(min(per_round), 3), "clip_s": [round(v, 4) for v in values]}
        if k != "eager":
            row.update(compile_seconds=compile_seconds[k], max_abs_diff_vs_eager=max_abs_diff[k])
        rows.append(row)
    return {"config": name, "recipe": recipe.model_dump(mode="json"), "steps": first.num_steps, "shape": list(x.shape),
            "weights": str(eager_weights.relative_to(ROOT)) if eager_weights else "random (torch.manual_seed(0))", "rows": rows,
            "skipped": skipped}


def markdown(configs: list[dict]) -> str:
    """The README's table of this run."""
    lines = ["| config | backend | clip s: median | mean | worst | speedup vs eager diffusers loop: median | mean of rounds | worst round |",
             "|---|---|---|---|---|---|---|---|"]
    for config in configs:
        for row in config["rows"]:
            lines.append(f"| {config['config']} | {row['backend']} | {row['clip_s_median']:.3f} | {row['clip_s_mean']:.3f} | "
                         f"{row['clip_s_worst']:.3f} | {row['speedup_vs_eager']:.2f}× | {row['speedup_vs_eager_mean']:.2f}× | "
                         f"{row['speedup_vs_eager_worst_round']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="teacher,student,wide,wide-bf16")
    parser.add_argument("--backends", default="torch,aoti,onnx")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch (and ONNX Runtime) threads for every runner")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. that the machine was shared)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "backends.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    backends = [b for b in args.backends.split(",") if b]
    results = []
    with tempfile.TemporaryDirectory(prefix="vdopt-bench-backends-") as tmp:
        for name in (c for c in args.configs.split(",") if c):
            results.append(bench_config(name, backends, args.rounds, args.warmup, Path(tmp)))
            print(f"\n{name}: whole clip ({results[-1]['steps']} steps, {tuple(results[-1]['shape'])}), {args.threads} thread(s), "
                  f"{args.rounds} interleaved rounds, eager first")
            print(f"{'backend':<8} {'median s':>9} {'mean s':>8} {'worst s':>8} {'speedup: median':>16} {'mean':>6} {'worst round':>12}")
            for row in results[-1]["rows"]:
                print(f"{row['backend']:<8} {row['clip_s_median']:>9.3f} {row['clip_s_mean']:>8.3f} {row['clip_s_worst']:>8.3f} "
                      f"{row['speedup_vs_eager']:>15.2f}x {row['speedup_vs_eager_mean']:>5.2f}x {row['speedup_vs_eager_worst_round']:>11.2f}x")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = (f"python bench/backends.py --configs {args.configs} --backends {args.backends} --rounds {args.rounds} "
               f"--warmup {args.warmup} --threads {args.threads}" + (f" --note {json.dumps(args.note)}" if args.note else "")
               + ("" if out.resolve() == (ROOT / "bench" / "results" / "backends.json") else f" --json {args.json}"))
    out.write_text(json.dumps({
        "command": command, "prompt": PROMPT, "device": "cpu", "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
        "load_average_start": load_start, "load_average_end": os.getloadavg(), "note": args.note,
        "rounds": args.rounds, "warmup": args.warmup, "configs": results}, indent=2))
    print("\nREADME table:\n" + markdown(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
