"""CMD form vs the teacher (issue 21): wall clock per clip on the same backend, side by side, the quality row of each,
network FLOPs per clip of every stage and how they grow with the frame count, and the autoencoder's reconstruction
of held-out real clips and of the teacher's own clips.

Both bundles sample at the teacher's 50 steps with guidance 3 (the CMD motion loop at the scale its weights record).
Timing: interleaved rounds; each round runs, for every program, one generation of `--batch` clips (a single clip's
latency at the default 1) and one of `--set-batch` clips (the cost per clip of making a set of clips, default 4),
same prompts and seeds. Per batch: the per-clip median and the worst round, the ratio of the medians and the least
ratio of a round, and the CMD bundle's median milliseconds per clip in each stage (`Session.run(on_stage=...)`).
Quality: `vdopt.eval.suite` over `--prompts` clips (shape / colour / direction accuracy, FVD-MS, track direction
accuracy); the teacher's row is the eager teacher's clips (cached in `--cache`), which its bundle
reproduces to float rounding (tests/test_differential.py), the CMD row is its bundle's own clips.
FLOPs: `torch.utils.flop_counter` over the exported program of each network (one guided evaluation = a batch of 2)
times the steps, at 8, 16 and 32 frames (the teacher's temporal position table sized to each; weights do not change
FLOPs). Writes JSON.

    python bench/cmd.py [--recipe recipes/cmd_reference.yaml] [--backend aoti] [--batch 1] [--set-batch 4] [--rounds 5]
        [--prompts 256] [--cache out/evcache] [--json bench/results/cmd.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from e2e import add_run_arguments, interleaved_rounds, with_batch
from flops import forward_flops
from results_file import write_results
from vdopt.cmd.model import ContentMotionAutoencoder, Decoder, MotionDenoiser, MotionDiT, load_cmd
from vdopt.compiler import compile_bundle
from vdopt.families.base import bypass
from vdopt.eval import suite
from vdopt.eval.cli import cached, generate_from_bundle, generator_for
from vdopt.recipe import load_recipe, recipe_with
from vdopt.reference.model import DEFAULT_STEPS, TEACHER_CONFIG, ReferenceDenoiser, build_teacher
from vdopt.runtime import Session

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"
TARGET_SPEEDUP = 4.0


def exported_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    return forward_flops(torch.export.export(module.eval(), inputs, strict=False).module(), *inputs)


def flop_rows(weights: Path, steps: int) -> dict[str, dict[str, int]]:
    """Network FLOPs per clip (guided: 2 evaluations per step) for the teacher and each CMD stage, by frame count."""
    _, motion, _, _, meta = load_cmd(weights)
    text = torch.randn(2, 3, TEACHER_CONFIG["caption_channels"])
    size = TEACHER_CONFIG["sample_size"]
    rows: dict[str, dict[str, int]] = {}
    for frames in (8, 16, 32):
        teacher = ReferenceDenoiser(build_teacher({**TEACHER_CONFIG, "video_length": frames}))
        t = torch.full((2,), 500.0)
        content_model = bypass(build_teacher(TEACHER_CONFIG), meta.get("content_removed_blocks", []))
        autoencoder = ContentMotionAutoencoder(**meta["autoencoder"])
        motion_net = MotionDiT(**{**motion.config, "frames": frames})
        latent = torch.randn(2, motion.config["motion_channels"], frames, 1, motion.config["motion_width"])
        content = torch.randn(2, 3, 1, size, size)
        row = {"teacher": steps * exported_flops(teacher, torch.randn(2, 3, frames, size, size), t, text),
               "cmd_content": steps * exported_flops(ReferenceDenoiser(content_model), content, t, text),
               "cmd_motion": steps * exported_flops(MotionDenoiser(motion_net), latent, t, text, content),
               "cmd_decode": exported_flops(Decoder(autoencoder), content[:1], latent[:1])}
        row["cmd_total"] = row["cmd_content"] + row["cmd_motion"] + row["cmd_decode"]
        rows[str(frames)] = row
        print(f"{frames} frames: teacher {row['teacher'] / 1e9:.2f} GFLOP/clip, CMD {row['cmd_total'] / 1e9:.2f} "
              f"(content {row['cmd_content'] / 1e9:.2f}, motion {row['cmd_motion'] / 1e9:.2f}, decode {row['cmd_decode'] / 1e9:.3f})",
              flush=True)
    return rows


def reconstruction(weights: Path, clips: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict, dict]:
    """The autoencoder's reconstructions of `clips`: (PSNR per clip, the classifier's attribute accuracy on the clips,
    on the reconstructions)."""
    from vdopt.eval.classifier import load_classifier
    from vdopt.eval.metrics import attribute_accuracy, psnr

    autoencoder = load_cmd(weights)[0]
    with torch.no_grad():
        recon = torch.cat([autoencoder(chunk) for chunk in clips.split(32)]).clamp(-1, 1)
    classifier = load_classifier()
    original, rebuilt = (attribute_accuracy(classifier.predict(x)[0], prompts) for x in (clips, recon))
    return psnr(recon, clips), original, rebuilt


def points_lost(original: dict, rebuilt: dict) -> dict[str, float]:
    return {k: round(100 * (original[k] - rebuilt[k]), 2) for k in ("shape", "colour", "direction", "all")}


def autoencoder_row(weights: Path, n: int) -> dict:
    """Reconstruction of `n` real clips the autoencoder never trained on (the evaluation prompt set, a quarter of them
    held-out attribute triples, seeds apart from the training batches): PSNR, and the classifier's attribute accuracy
    on the originals and on the reconstructions."""
    prompts, _, _ = suite.prompt_set(n, seed=1)
    values, original, rebuilt = reconstruction(weights, suite.real_clips(prompts, base_seed=9_000_000), prompts)
    row = {"clips": n, "psnr_mean": round(float(values.mean()), 2), "psnr_worst": round(float(values.min()), 2),
           "psnr_p5": round(float(values.quantile(0.05)), 2), "accuracy_original": original, "accuracy_reconstructed": rebuilt,
           "points_lost": points_lost(original, rebuilt)}
    print(f"autoencoder over {n} held-out real clips: PSNR {row['psnr_mean']:.2f} dB (worst {row['psnr_worst']:.2f}, 5th pct "
          f"{row['psnr_p5']:.2f}); accuracy points lost on reconstructions {row['points_lost']}", flush=True)
    return row


def teacher_reconstruction_row(weights: Path, clips: torch.Tensor, prompts: list[str]) -> dict:
    """The autoencoder on the teacher's own clips (what the CMD form must imitate, and what its decoder must draw):
    PSNR against them, and the classifier's attribute accuracy on them and on their reconstructions."""
    values, original, rebuilt = reconstruction(weights, clips, prompts)
    row = {"clips": len(clips), "psnr_mean": round(float(values.mean()), 2), "psnr_worst": round(float(values.min()), 2),
           "accuracy_teacher": original, "accuracy_reconstructed": rebuilt, "points_lost": points_lost(original, rebuilt)}
    print(f"autoencoder over the teacher's {len(clips)} clips: PSNR {row['psnr_mean']:.2f} dB (worst {row['psnr_worst']:.2f}); "
          f"accuracy points lost on reconstructions {row['points_lost']}", flush=True)
    return row


def contact_sheet(weights: Path, teacher_fn, path: Path, n: int = 8) -> Path:
    """Content frame (held over the clip's frames), decoded CMD clip and the teacher's clip, side by side, for the first
    `n` evaluation prompts (the eager CMD sampler equals its bundle within 1e-5, tests/test_cmd.py)."""
    from vdopt.cmd.sample import CMDGenerator

    generator = CMDGenerator(weights)
    prompts, seeds, _ = suite.prompt_set(n, seed=0)
    cond, uncond = generator.encode(prompts)
    contents, clips = [], []
    for k in range(n):
        content = generator.content(cond[k:k + 1], uncond[k:k + 1], int(seeds[k]))
        contents.append(content)
        clips.append(generator.decode(content, generator.motion(cond[k:k + 1], uncond[k:k + 1], content, int(seeds[k]))))
    frames = torch.cat(clips).shape[2]
    rows = [("content frame", torch.cat(contents).expand(-1, -1, frames, -1, -1)), ("CMD clip", torch.cat(clips)),
            ("teacher clip", teacher_fn(prompts, [int(s) for s in seeds]))]
    return suite.contact_sheet(rows, prompts, path)


def timing_row(seconds: list[float]) -> dict:
    return {"seconds_per_clip_median": round(statistics.median(seconds), 4), "seconds_per_clip_worst": round(max(seconds), 4),
            "seconds_per_clip": [round(s, 4) for s in seconds]}


def speedup_row(teacher: list[float], cmd: list[float]) -> dict[str, float]:
    """The ratio of the medians, and the least ratio of a round (each round times both programs back to back)."""
    return {"median": round(statistics.median(teacher) / statistics.median(cmd), 3),
            "least_round": round(min(t / c for t, c in zip(teacher, cmd)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/cmd_reference.yaml")
    parser.add_argument("--teacher-recipe", default="recipes/reference.yaml")
    parser.add_argument("--backend", default="aoti")
    add_run_arguments(parser, rounds=5, results="cmd.json")
    parser.add_argument("--set-batch", type=int, default=4,
                        help="also time generations of this many clips (the cost per clip of making a set of clips), "
                             "interleaved with the --batch ones; 0: only --batch")
    parser.add_argument("--sheet", default=str(ROOT / "docs" / "cmd_contact_sheet.png"), help="contact sheet PNG")
    args = parser.parse_args()
    os.chdir(ROOT)

    cmd_recipe = load_recipe(args.recipe)
    weights = Path(next(p.params["weights"] for p in cmd_recipe.passes if p.name == "rewrite_content_motion"))
    autoencoder = autoencoder_row(weights, args.prompts)
    flops = flop_rows(weights, DEFAULT_STEPS)
    batches = sorted({args.batch, args.set_batch} - {0})
    prompts, seeds, _ = suite.prompt_set(args.rounds * max(batches), seed=0)
    names = {"teacher": args.teacher_recipe, "cmd": args.recipe}
    with tempfile.TemporaryDirectory(prefix="vdopt-bench-cmd-") as tmp:
        bundles = {}
        for name, recipe_path in names.items():
            start = time.perf_counter()
            bundles[name] = Path(tmp) / f"{name}.vdopt"
            compile_bundle(with_batch(recipe_with(load_recipe(recipe_path), backend=args.backend), max(batches)), TEACHER,
                           bundles[name], verify=False)
            print(f"compiled {name} ({args.backend}) in {time.perf_counter() - start:.1f} s", flush=True)
        sessions = {name: Session(path) for name, path in bundles.items()}
        encoders = {name: session.prompt_encoder() for name, session in sessions.items()}

        programs = {f"{name} x{batch}": (name, batch) for batch in batches for name in names}
        stage_seconds: dict[int, dict[str, list[float]]] = {batch: {} for batch in batches}

        def generate(key: str, k: int) -> float:
            name, batch = programs[key]
            cond, uncond = encoders[name](prompts[k * batch:(k + 1) * batch])
            start = time.perf_counter()
            sessions[name].run(cond, uncond, seed=int(seeds[k]), progress=False,
                               on_stage=lambda stage, s: stage_seconds[batch].setdefault(stage, []).append(s / batch))
            return time.perf_counter() - start

        per_call, load_start, load_end = interleaved_rounds(list(programs), generate, args.rounds)
        seconds = {program: [s / program[1] for s in per_call[label]] for label, program in programs.items()}
        stage_ms = {batch: {stage: round(1000 * statistics.median(values[1:]), 2) for stage, values in stages.items()}
                    for batch, stages in stage_seconds.items()}  # [0]: the warm-up round

        teacher_fn, _, teacher_label = generator_for("teacher", DEFAULT_STEPS, None, "cpu")
        print(f"wrote {contact_sheet(weights, cached(teacher_fn, teacher_label, args.cache), Path(args.sheet))}", flush=True)
        rows = {}
        for name in names:
            generate_fn = cached(teacher_fn, teacher_label, args.cache) if name == "teacher" else generate_from_bundle(bundles[name])
            evaluated = suite.evaluate(generate_fn, args.prompts, args.seed, label=name, progress=False)
            result = evaluated["all"]
            if name == "teacher":
                teacher_reconstruction = teacher_reconstruction_row(weights, evaluated["_videos"],
                                                                    suite.prompt_set(args.prompts, args.seed)[0])
            timing = {str(batch): timing_row(seconds[(name, batch)]) for batch in batches}
            rows[name] = {**timing[str(args.batch)], "by_batch": timing, "accuracy": result["accuracy"], "fvd_ms": result["fvd_ms"],
                          "track_direction_accuracy": result["temporal"]["track_direction_accuracy"]}
            print(f"evaluated {name}: shape {100 * result['accuracy']['shape']:.1f} %, colour "
                  f"{100 * result['accuracy']['colour']:.1f} %, direction {100 * result['accuracy']['direction']:.1f} %, "
                  f"FVD-MS {result['fvd_ms']:.1f}", flush=True)

    speedups = {str(batch): speedup_row(seconds[("teacher", batch)], seconds[("cmd", batch)]) for batch in batches}
    teacher, cmd = rows["teacher"], rows["cmd"]
    points = {k: round(100 * (teacher["accuracy"][k] - cmd["accuracy"][k]), 1) for k in ("shape", "colour", "direction")}
    checks = {"autoencoder PSNR >= 30 dB": autoencoder["psnr_mean"] >= 30,
              "reconstruction accuracy within 1 point": max(autoencoder["points_lost"][k] for k in ("shape", "colour", "direction")) <= 1,
              **{f"speedup >= 4x, {batch} clip(s) per generation": speedups[str(batch)]["median"] >= TARGET_SPEEDUP
                 for batch in batches},
              "shape within 5 points": points["shape"] <= 5,
              "colour within 5 points": points["colour"] <= 5, "direction within 5 points": points["direction"] <= 5,
              "FVD-MS <= 1.5x teacher": cmd["fvd_ms"] <= 1.5 * teacher["fvd_ms"]}
    print(f"\n{args.backend}, {args.rounds} interleaved rounds; quality over {args.prompts} clips")
    print(f"{'program':<10} {'batch':>5} {'s/clip':>8} {'worst':>8} {'shape':>6} {'colour':>7} {'dir':>6} {'FVD-MS':>7}")
    for batch in batches:
        for name, row in rows.items():
            timing = row["by_batch"][str(batch)]
            print(f"{name:<10} {batch:>5} {timing['seconds_per_clip_median']:>8.3f} {timing['seconds_per_clip_worst']:>8.3f} "
                  f"{100 * row['accuracy']['shape']:>6.1f} {100 * row['accuracy']['colour']:>7.1f} "
                  f"{100 * row['accuracy']['direction']:>6.1f} {row['fvd_ms']:>7.1f}")
    for batch in batches:
        print(f"{batch} clip(s) per generation: CMD {speedups[str(batch)]['median']:.2f}x faster per clip (least round "
              f"{speedups[str(batch)]['least_round']:.2f}x); stages, ms per clip (median): "
              + ", ".join(f"{stage} {ms:.1f}" for stage, ms in stage_ms[batch].items()))
    print(f"CMD: accuracy points lost {points}; FVD-MS {cmd['fvd_ms'] / teacher['fvd_ms']:.2f}x the teacher's")
    for check, ok in checks.items():
        print(f"  {check}: {'met' if ok else 'NOT met'}")
    write_results(args.json, {"backend": args.backend, "batch": args.batch, "batches": batches, "rounds": args.rounds,
                              "prompts": args.prompts, "seed": args.seed, "recipe": args.recipe, "rows": rows,
                              "speedup_median": speedups[str(args.batch)]["median"],
                              "speedup_worst_round": speedups[str(args.batch)]["least_round"], "speedup_by_batch": speedups,
                              "cmd_stage_ms_per_clip": stage_ms[args.batch],
                              "cmd_stage_ms_per_clip_by_batch": {str(b): ms for b, ms in stage_ms.items()},
                              "points_lost": points, "checks": checks,
                              "autoencoder": autoencoder, "autoencoder_on_teacher_clips": teacher_reconstruction,
                              "flops_per_clip": flops}, load_start, load_end)


if __name__ == "__main__":
    main()
