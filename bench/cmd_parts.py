"""Where a CMD form loses quality: each of its parts swapped in for the teacher's clip, one at a time.

On the evaluation prompts (eval seed 0), from the teacher's own clips (cached in `--cache`):
- `teacher`: the teacher's clips;
- `autoencoder`: those clips encoded and decoded (the decoder alone);
- `teacher content + generated motion`: the teacher clip's content frame, a motion latent from the motion generator
  (the clip's seed, as the bundle draws it), decoded;
- `CMD form`: content generator -> motion generator -> decode, as the bundle runs it.
Each row: the classifier's shape / colour / direction accuracy and FVD-MS against real clips of the same prompts.
Writes JSON; one row per `--weights` file.

    python bench/cmd_parts.py [--weights vdopt/reference/weights/cmd.safetensors,...] [--prompts 64]
        [--json bench/results/cmd_parts.json]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from e2e import ROOT
from results_file import write_results
from vdopt.cmd.sample import CMDGenerator
from vdopt.eval import metrics
from vdopt.eval import suite
from vdopt.eval.classifier import load_classifier
from vdopt.eval.cli import cached, generator_for
from vdopt.reference.model import DEFAULT_STEPS


def quality(classifier, clips: torch.Tensor, prompts: list[str], real_features: torch.Tensor) -> dict:
    predicted, features = classifier.predict(clips.clamp(-1, 1))
    accuracy = metrics.attribute_accuracy(predicted, prompts)
    return {"shape": accuracy["shape"], "colour": accuracy["colour"], "direction": accuracy["direction"],
            "fvd_ms": round(metrics.frechet_distance_features(features, real_features), 2)}


def cached_teacher_clips(prompts: list[str], seeds: list[int], cache: str) -> torch.Tensor:
    """The eager teacher's clips (clip k from seed `seeds[k]`), made in batches of 16 and kept in / read from `cache`."""
    teacher_fn, _, label = generator_for("teacher", DEFAULT_STEPS, None, "cpu")
    return torch.cat([cached(teacher_fn, label, cache)(prompts[i:i + 16], seeds[i:i + 16])
                      for i in range(0, len(prompts), 16)]).clamp(-1, 1)


@torch.no_grad()
def part_rows(weights: Path, teacher_clips: torch.Tensor, prompts: list[str], seeds: list[int], classifier,
              real_features: torch.Tensor) -> dict[str, dict]:
    generator = CMDGenerator(weights)
    autoencoder = generator.decoder.autoencoder
    content, motion = autoencoder.encode(teacher_clips)
    content = content.unsqueeze(2)
    generated_content, generated_motion, motion_for_teacher_content = [], [], []
    for k, (prompt, seed) in enumerate(zip(prompts, seeds)):
        cond, uncond = generator.encode([prompt])
        motion_for_teacher_content.append(generator.motion(cond, uncond, content[k:k + 1], seed))
        generated_content.append(generator.content(cond, uncond, seed))
        generated_motion.append(generator.motion(cond, uncond, generated_content[-1], seed))
    clips = {"teacher": teacher_clips,
             "autoencoder": generator.decode(content, motion),
             "teacher content + generated motion": generator.decode(content, torch.cat(motion_for_teacher_content)),
             "CMD form": generator.decode(torch.cat(generated_content), torch.cat(generated_motion))}
    rows = {name: quality(classifier, value, prompts, real_features) for name, value in clips.items()}
    for name, row in rows.items():
        print(f"{weights.name:<28} {name:<36} shape {100 * row['shape']:5.1f}  colour {100 * row['colour']:5.1f}  "
              f"direction {100 * row['direction']:5.1f}  FVD-MS {row['fvd_ms']:6.1f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="vdopt/reference/weights/cmd.safetensors", help="comma-separated CMD weights files")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--cache", default=str(ROOT / "out" / "evcache"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "cmd_parts.json"))
    args = parser.parse_args()
    os.chdir(ROOT)

    load_start = os.getloadavg()
    prompts, seeds, _ = suite.prompt_set(args.prompts, seed=0)
    teacher = cached_teacher_clips(prompts, seeds, args.cache)
    classifier = load_classifier()
    real_features = classifier.predict(suite.real_clips(prompts, suite.REAL_SEED_A))[1]
    rows = {path: part_rows(Path(path), teacher, prompts, [int(s) for s in seeds], classifier, real_features)
            for path in args.weights.split(",")}
    write_results(args.json, {"prompts": args.prompts, "seed": 0, "rows": rows}, load_start, os.getloadavg())


if __name__ == "__main__":
    main()
