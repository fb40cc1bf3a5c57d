"""Step time of each backend as a ratio to the eager diffusers module, measured side by side.

For one reference-sized config (the reference teacher's Latte: 8 frames of 32x32 RGB, guidance on),
compiles a bundle per backend, then times one denoising step of each in interleaved rounds — eager
first in every round — so all backends see the same machine state. Prints a table, writes JSON.

    python bench/backends.py [--backends torch,aoti,onnx] [--rounds 20] [--device cpu] [--json bench/results/backends.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vdopt.compiler import compile_bundle
from vdopt.families import descriptor_for
from vdopt.recipe import load_recipe
from vdopt.runtime import Session

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "reference.yaml"


def eager_step(recipe, device: str):
    """The unoptimised diffusers module in a hand-written guided Euler step."""
    from vdopt.sampler import diffusers_scheduler

    descriptor = descriptor_for(recipe.model.family)
    model = descriptor.build(dict(descriptor.tiny_config)).eval().to(device)
    scheduler = diffusers_scheduler(recipe.sampler)
    sigmas, timesteps = scheduler.sigmas.to(device), scheduler.timesteps.to(device)
    scale = recipe.sampler.guidance_scale

    @torch.no_grad()
    def step(x, i, cond, uncond):
        out = model(hidden_states=torch.cat([x, x]), timestep=timesteps[i].expand(2 * x.shape[0]),
                    encoder_hidden_states=torch.cat([cond, uncond]), return_dict=False)[0]
        out_cond, out_uncond = out.chunk(2)
        return x + (sigmas[i + 1] - sigmas[i]) * (out_uncond + scale * (out_cond - out_uncond))

    return model, step


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,aoti,onnx")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="bench/results/backends.json")
    args = parser.parse_args()

    recipe = load_recipe(RECIPE)
    torch.manual_seed(0)
    model, eager = eager_step(recipe, args.device)
    spec = recipe.model.input
    x = torch.randn(spec.batch, 3, spec.frames.min, spec.height.min, spec.width.min, device=args.device)
    cond = torch.randn(spec.batch, 3, model.config.caption_channels, device=args.device)
    uncond = torch.zeros_like(cond)

    runners = {"eager": lambda: eager(x, 10, cond, uncond)}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "weights.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
        for backend in args.backends.split(","):
            bundle_recipe = recipe.model_copy(update={"lower": recipe.lower.model_copy(update={"backend": backend})})
            path = Path(tmp) / f"{backend}.vdopt"
            start = time.perf_counter()
            compile_bundle(bundle_recipe, checkpoint, path)
            print(f"compiled {backend} in {time.perf_counter() - start:.1f} s")
            session = Session(path, device=args.device)
            run = session.runner(session.segment_for(tuple(x.shape)))
            i = torch.tensor(10, device=args.device)
            runners[backend] = (lambda run=run, i=i: run(x, i, cond, uncond))

        for fn in runners.values():
            for _ in range(args.warmup):
                fn()
        samples = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, fn in runners.items():
                samples[name].append(timed(fn, args.device))

    eager_ms = statistics.median(samples["eager"]) * 1000
    rows = []
    print(f"\nstep time, reference-sized Latte {tuple(x.shape)}, guidance on, {args.device}, median of {args.rounds} interleaved rounds")
    print(f"{'backend':<8} {'ms/step':>9} {'vs eager':>9}")
    for name, values in samples.items():
        ms = statistics.median(values) * 1000
        rows.append({"backend": name, "ms_per_step": round(ms, 3), "speedup_vs_eager": round(eager_ms / ms, 3),
                     "ratio_to_eager": round(ms / eager_ms, 3)})
        print(f"{name:<8} {ms:>9.2f} {eager_ms / ms:>8.2f}x")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(), "shape": list(x.shape), "rounds": args.rounds, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
