"""The C++ runtime (cuda/runtime, `vdopt-run`) against the Python `Session` on the same bundles, side by side.

Per bundle, both run the same prompts and seed `--rounds` times, interleaved (Python first each round); each
reports its run's total time, the loop's span (first segment call's start to the last one's end) and the time
inside the compiled segments (AOTInductor runs). The loop's own cost per step is (loop - segments) / steps: inputs,
outputs, state, the split step's wiring and flag read; setup (noise, state, conditioning) is total - loop, per run.
Bundles: the
shipped teacher (50 guided steps) and its cached recipe with the conditional split (`split_conditionals:
always`: head, flag, compute | reuse, tail per step, the most runtime work per step). Both latents are compared.

    python bench/cpp.py [--rounds 5] [--threads 1] [--json bench/results/cpp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vdopt.compiler import compile_bundle
from vdopt.recipe import load_recipe, parse_recipe
from vdopt.runtime import Session

from results_file import write_results

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"
PROMPTS = ["red circle moving up-left"]


def build_runtime(directory: Path) -> Path:
    import torch.utils

    for command in (["cmake", "-S", str(ROOT / "cuda" / "runtime"), "-B", str(directory), "-G", "Ninja",
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DCMAKE_BUILD_TYPE=Release"],
                    ["cmake", "--build", str(directory)]):
        subprocess.run(command, check=True, capture_output=True)
    return directory / "vdopt-run"


def recipes() -> dict:
    teacher = load_recipe(ROOT / "recipes" / "reference.yaml").model_dump(mode="json")
    cached = load_recipe(ROOT / "recipes" / "reference_cached.yaml").model_dump(mode="json")
    cached["lower"]["split_conditionals"] = "always"
    cached.pop("verify", None)
    return {"teacher (50 steps)": parse_recipe(teacher), "cached, split step (50 steps)": parse_recipe(cached)}


def timed_session(bundle: Path) -> tuple[Session, dict]:
    """A Session whose segment runners record, in the returned dict, their summed time and the first call's start
    and the last call's end (reset `clock` before each run)."""
    session, clock = Session(bundle), {"segments": 0.0, "first": None, "last": None}
    load = session.load

    def timed_load(*args, **kwargs):
        run = load(*args, **kwargs)

        def timed(*inputs):
            start = time.perf_counter()
            outputs = run(*inputs)
            end = time.perf_counter()
            clock["segments"] += end - start
            clock["first"] = clock["first"] or start
            clock["last"] = end
            return outputs

        return timed

    session.load = timed_load
    return session, clock


def per_step(runs: list[dict], steps: int) -> dict:
    totals = [1e3 * r["total_seconds"] / steps for r in runs]
    loops = [1e3 * (r["loop_seconds"] - r["segments_seconds"]) / steps for r in runs]
    shares = [100 * o / t for o, t in zip(loops, totals)]
    setups = [1e3 * (r["total_seconds"] - r["loop_seconds"]) for r in runs]
    return {"step_ms_median": round(statistics.median(totals), 3), "step_ms_worst": round(max(totals), 3),
            "loop_overhead_ms_per_step_median": round(statistics.median(loops), 4),
            "loop_overhead_ms_per_step_worst": round(max(loops), 4),
            "loop_overhead_percent_of_step_median": round(statistics.median(shares), 3),
            "loop_overhead_percent_of_step_worst": round(max(shares), 3),
            "setup_ms_per_run_median": round(statistics.median(setups), 3)}


def bench(name: str, recipe, vdopt_run: Path, rounds: int, threads: int, tmp: Path) -> dict:
    bundle = tmp / f"{len(list(tmp.iterdir()))}.vdopt"
    compile_bundle(recipe, TEACHER, bundle, verify=False)
    session, clock = timed_session(bundle)
    cond, uncond = session.prompt_encoder()(PROMPTS)
    save_file({k: v.contiguous() for k, v in cond.items()}, str(tmp / "cond.safetensors"))
    save_file({k: v.contiguous() for k, v in uncond.items()}, str(tmp / "uncond.safetensors"))
    session.run(cond, uncond, seed=0, progress=False)  # loads the segments
    python_runs, cpp_runs = [], []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for _ in range(rounds):
        clock.update(segments=0.0, first=None, last=None)
        start = time.perf_counter()
        expected = session.run(cond, uncond, seed=0, progress=False)
        python_runs.append({"total_seconds": time.perf_counter() - start, "loop_seconds": clock["last"] - clock["first"],
                            "segments_seconds": clock["segments"]})
        # two runs per process: the first loads the packages, the second is timed
        subprocess.run([str(vdopt_run), str(bundle), "--cond", str(tmp / "cond.safetensors"), "--uncond",
                        str(tmp / "uncond.safetensors"), "--seed", "0", "--repeat", "2", "--timings", str(tmp / "t.json"),
                        "-o", str(tmp / "latent.safetensors")], check=True, capture_output=True, env=env)
        cpp_runs.append(json.loads((tmp / "t.json").read_text())["runs"][-1])
    got = load_file(str(tmp / "latent.safetensors"))["latent"]
    steps = session.num_steps
    row = {"bundle": name, "steps": steps, "max_abs_diff": float((got - expected).abs().max()),
           "python": per_step(python_runs, steps), "cpp": per_step(cpp_runs, steps)}
    py, cpp = row["python"], row["cpp"]
    print(f"[{name}] step: python {py['step_ms_median']:.2f} ms, C++ {cpp['step_ms_median']:.2f} ms; loop overhead per "
          f"step: python {py['loop_overhead_ms_per_step_median']:.3f} ms ({py['loop_overhead_percent_of_step_median']:.2f} %), "
          f"C++ {cpp['loop_overhead_ms_per_step_median']:.3f} ms ({cpp['loop_overhead_percent_of_step_median']:.2f} %, worst "
          f"{cpp['loop_overhead_percent_of_step_worst']:.2f} %); setup per run: python {py['setup_ms_per_run_median']:.2f} ms, "
          f"C++ {cpp['setup_ms_per_run_median']:.2f} ms; latents differ by {row['max_abs_diff']:.1e}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "cpp.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        vdopt_run = build_runtime(Path(tmp) / "runtime")
        bundles = Path(tmp) / "bundles"
        bundles.mkdir()
        rows = [bench(name, recipe, vdopt_run, args.rounds, args.threads, bundles) for name, recipe in recipes().items()]
    write_results(args.json, {"threads": args.threads, "prompts": PROMPTS, "rows": rows}, load_start, os.getloadavg())


if __name__ == "__main__":
    main()
