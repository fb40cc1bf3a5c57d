"""Step time of each backend as a ratio to the eager diffusers module, measured side by side.

On the shipped reference teacher (`recipes/reference.yaml`, its real weights
`vdopt/reference/weights/teacher.safetensors`: a pixel-space Latte, 8 frames of 32x32 RGB, guidance
on), compiles a bundle per backend, then times one guided denoising step of each in interleaved
rounds -- eager first in every round -- so all backends see the same machine state. The eager
baseline is the same checkpoint loaded into the diffusers `LatteTransformer3DModel` behind the
family's adapter (`ReferenceDenoiser`: prompt-layout channels in, flow velocity out), in a
hand-written guided Euler step. Before timing, every backend's step output is checked against the
eager one on the same inputs (max |diff| goes into the JSON).

A timed sample is the mean of `--repeat` back-to-back calls of one program. Per backend it reports
the median, mean and worst sample, and the speedup over eager as the ratio of medians, the mean of
the per-round ratios and the worst round (the smallest per-round ratio). Prints a table, writes JSON.

    python bench/backends.py [--backends torch,aoti,onnx] [--rounds 30] [--repeat 5] [--threads N] [--device cpu]
        [--note "..."] [--json bench/results/backends.json]
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

from vdopt.capture import load_denoiser
from vdopt.compiler import compile_bundle
from vdopt.recipe import load_recipe
from vdopt.runtime import Session
from vdopt.sampler import diffusers_scheduler

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "reference.yaml"
WEIGHTS = ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"
PROMPT = "red circle moving up-left"
STEP = 10  # which of the 50 steps is timed (the step table is inside every program)


def eager_step(recipe, weights: Path, device: str):
    """The unoptimised diffusers module (real weights, the family's adapter) in a hand-written guided Euler step."""
    denoiser, _, _ = load_denoiser(recipe, weights)
    denoiser = denoiser.eval().to(device)
    scheduler = diffusers_scheduler(recipe.sampler)
    sigmas, timesteps = scheduler.sigmas.to(device), scheduler.timesteps.to(device)
    scale = recipe.sampler.guidance_scale

    @torch.no_grad()
    def step(x, i, cond, uncond):
        out = denoiser(torch.cat([x, x]), timesteps[i].expand(2 * x.shape[0]), torch.cat([cond, uncond]))
        out_cond, out_uncond = out.chunk(2)
        return x + (sigmas[i + 1] - sigmas[i]) * (out_uncond + scale * (out_cond - out_uncond))

    return step


def timed(fn, device: str, repeat: int) -> float:
    """Seconds per call, the mean of `repeat` back-to-back calls."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (list, tuple)) else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,aoti,onnx")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5, help="step calls per timed sample (the sample is their mean)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--weights", default=str(WEIGHTS), help="checkpoint (default: the shipped teacher)")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. that the machine was shared)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "backends.json"))
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if args.threads:
        torch.set_num_threads(args.threads)

    load_start = os.getloadavg()
    recipe = load_recipe(args.recipe)
    eager = eager_step(recipe, Path(args.weights), args.device)
    spec = recipe.model.input
    i = STEP

    runners, compile_seconds, max_abs_diff = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="vdopt-bench-backends-") as tmp:
        x = cond = uncond = None
        for backend in backends:
            bundle_recipe = recipe.model_copy(update={"lower": recipe.lower.model_copy(update={"backend": backend})})
            path = Path(tmp) / f"{backend}.vdopt"
            start = time.perf_counter()
            compile_bundle(bundle_recipe, args.weights, path)
            compile_seconds[backend] = round(time.perf_counter() - start, 1)
            print(f"compiled {backend} in {compile_seconds[backend]:.1f} s", flush=True)
            session = Session(path, device=args.device)
            if x is None:  # the same inputs for every program: the bundle's own prompt encoder, seed 0
                encode = session.prompt_encoder()
                cond_d, uncond_d = encode(PROMPT)
                cond = cond_d["encoder_hidden_states"].to(args.device)
                uncond = uncond_d["encoder_hidden_states"].to(args.device)
                x = session.initial_noise(0, session.latent_shape(1, spec.frames.min, spec.height.min, spec.width.min))
            run = session.runner(session.segment_for(tuple(x.shape)))
            sizes = session.sizes_of(tuple(x.shape))
            conds = session.check_cond("cond", {"encoder_hidden_states": cond}, sizes) + \
                session.check_cond("uncond", {"encoder_hidden_states": uncond}, sizes)
            state = session.initial_state(tuple(x.shape))
            step_i = torch.tensor(i, dtype=torch.int64, device=args.device)
            runners[backend] = (lambda run=run, step_i=step_i, conds=conds, state=state: run(x, step_i, *conds, *state))
        if x is None:
            raise SystemExit("no backend given")

        reference = eager(x, i, cond, uncond)
        for backend, fn in runners.items():
            max_abs_diff[backend] = float((first(fn()) - reference).abs().max())
            print(f"{backend}: max |step output - eager| = {max_abs_diff[backend]:.2e}", flush=True)

        runners = {"eager": lambda: eager(x, i, cond, uncond), **runners}
        for fn in runners.values():
            for _ in range(args.warmup):
                fn()
        samples = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, fn in runners.items():  # eager first in every round
                samples[name].append(timed(fn, args.device, args.repeat))

    eager_median = statistics.median(samples["eager"])
    rows = []
    shape = list(x.shape)
    print(f"\nstep time, shipped reference teacher {tuple(shape)}, guidance on, {args.device}, "
          f"{args.rounds} interleaved rounds of {args.repeat} calls each (eager first in each round)")
    print(f"{'backend':<8} {'median ms':>10} {'mean ms':>8} {'worst ms':>9} {'speedup: median':>16} {'mean':>6} {'worst round':>12}")
    for name, values in samples.items():
        per_round = [e / v for e, v in zip(samples["eager"], values)]
        median = statistics.median(values)
        row = {"backend": name,
               "ms_per_step_median": round(median * 1000, 3),
               "ms_per_step_mean": round(statistics.mean(values) * 1000, 3),
               "ms_per_step_worst": round(max(values) * 1000, 3),
               "speedup_vs_eager": round(eager_median / median, 3),  # ratio of medians
               "speedup_vs_eager_mean": round(statistics.mean(per_round), 3),  # mean of per-round ratios
               "speedup_vs_eager_worst_round": round(min(per_round), 3),
               "speedup_vs_eager_best_round": round(max(per_round), 3),
               "ms_per_step": [round(v * 1000, 3) for v in values]}
        if name != "eager":
            row["compile_seconds"] = compile_seconds[name]
            row["max_abs_diff_vs_eager"] = max_abs_diff[name]
        rows.append(row)
        print(f"{name:<8} {row['ms_per_step_median']:>10.1f} {row['ms_per_step_mean']:>8.1f} {row['ms_per_step_worst']:>9.1f} "
              f"{row['speedup_vs_eager']:>15.2f}x {row['speedup_vs_eager_mean']:>5.2f}x {row['speedup_vs_eager_worst_round']:>11.2f}x")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python bench/backends.py " + " ".join(
            f"--{k.replace('_', '-')} {json.dumps(v) if k == 'note' else v}" for k, v in vars(args).items()
            if k in ("backends", "rounds", "repeat", "warmup", "threads", "device", "note") and v not in ("", None))
        + ("" if Path(args.json).resolve() == (ROOT / "bench" / "results" / "backends.json") else f" --json {args.json}"),
        "recipe": str(Path(args.recipe).resolve().relative_to(ROOT)) if Path(args.recipe).resolve().is_relative_to(ROOT) else args.recipe,
        "weights": str(Path(args.weights).resolve().relative_to(ROOT)) if Path(args.weights).resolve().is_relative_to(ROOT) else args.weights,
        "prompt": PROMPT, "step": i, "device": args.device, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "load_average_start": load_start, "load_average_end": os.getloadavg(), "note": args.note,
        "shape": shape, "rounds": args.rounds, "repeat": args.repeat, "warmup": args.warmup, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
