"""The CMD motion loop's guidance scale, chosen on a validation prompt set (not the one bench/cmd.py reports).

The motion DiT learns the teacher's guided samples, so they carry the teacher's guidance already, and sampling it at
the teacher's scale again guides twice. This sweeps the motion loop's scale (the content loop stays at the teacher's)
over the CMD form as the bundle runs it, on prompt set `--prompt-seed` (default 1; bench/cmd.py and bench/cmd_parts.py
use 0), and reports the classifier's accuracy and FVD-MS against real clips of the same prompts, beside the teacher's.
`vdopt distill`'s `cmd.motion_guidance` records the chosen scale in cmd.safetensors.

    python bench/cmd_motion_guidance.py [--weights vdopt/reference/weights/cmd.safetensors] [--scales 1.5,2,2.5,3]
        [--prompts 256] [--prompt-seed 1] [--json bench/results/cmd_motion_guidance.json]
"""

from __future__ import annotations

import argparse
import os

import torch

from cmd_parts import cached_teacher_clips, quality
from e2e import ROOT
from results_file import write_results
from vdopt.cmd.sample import CMDGenerator
from vdopt.eval import suite
from vdopt.eval.classifier import load_classifier


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="vdopt/reference/weights/cmd.safetensors")
    parser.add_argument("--scales", default="1.5,2,2.5,3", help="comma-separated motion-loop guidance scales")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-seed", type=int, default=1)
    parser.add_argument("--cache", default=str(ROOT / "out" / "evcache"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "cmd_motion_guidance.json"))
    args = parser.parse_args()
    os.chdir(ROOT)

    load_start = os.getloadavg()
    prompts, seeds, _ = suite.prompt_set(args.prompts, seed=args.prompt_seed)
    classifier = load_classifier()
    real_features = classifier.predict(suite.real_clips(prompts, suite.REAL_SEED_A))[1]
    rows = {"teacher": quality(classifier, cached_teacher_clips(prompts, seeds, args.cache), prompts, real_features)}
    generator = CMDGenerator(args.weights)
    encoded = [generator.encode([prompt]) for prompt in prompts]
    contents = [generator.content(cond, uncond, int(seed)) for (cond, uncond), seed in zip(encoded, seeds)]
    for scale in (float(s) for s in args.scales.split(",")):
        generator.motion_guidance = scale
        clips = torch.cat([generator.decode(content, generator.motion(cond, uncond, content, int(seed)))
                           for (cond, uncond), content, seed in zip(encoded, contents, seeds)])
        rows[f"motion guidance {scale:g}"] = quality(classifier, clips, prompts, real_features)
    for name, row in rows.items():
        print(f"{name:<22} shape {100 * row['shape']:5.1f}  colour {100 * row['colour']:5.1f}  direction {100 * row['direction']:5.1f}  "
              f"FVD-MS {row['fvd_ms']:6.1f} ({row['fvd_ms'] / rows['teacher']['fvd_ms']:.2f}x the teacher's)", flush=True)
    write_results(args.json, {"weights": args.weights, "prompts": args.prompts, "prompt_seed": args.prompt_seed,
                              "content_guidance": generator.guidance_scale, "rows": rows}, load_start, os.getloadavg())


if __name__ == "__main__":
    main()
