"""Can the distillation discriminator tell the student's latents from the teacher's key points?

`vdopt distill`'s adversarial term (vdopt/distill/train.py) scores latents with trainable heads on
the frozen teacher's block features. On the reference model its hinge loss sits at 2.000 for the
whole run: real and fake logits never separate. This probe asks whether the features *could*
separate them. For a distillation output directory (its newest checkpoint, raw student weights) and
each student step k -> k+1, on held samples of its trajectories:

* fakes: the student's step from the teacher's key point x_k (what training feeds the discriminator)
  and from the student's own k-step rollout of the stored noise (what the sampler produces);
* RMS distance of each fake to the teacher's x_{k+1};
* a logistic-regression probe on the discriminator's token-pooled features (teacher at t_{k+1}),
  trained on half the pairs, accuracy on the other half (0.5 = no signal);
* mean absolute vertical pixel difference of real and fake (a blur measure).

    python bench/discriminator_probe.py [--run out/student] [--recipe recipes/distill_reference.yaml]
        [--teacher vdopt/reference/weights/teacher.safetensors] [--samples 192] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from vdopt.distill.common import load_teacher, schedule_for
from vdopt.distill.config import load_distill_recipe
from vdopt.distill.train import Trainer
from vdopt.distill.trajectories import load_trajectories
from vdopt.sampler import flow_euler_update

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 32


def student_step(trainer: Trainer, x: torch.Tensor, k: int, cond: list[torch.Tensor]) -> torch.Tensor:
    sigmas = trainer.schedule.sigmas
    t = torch.full((x.shape[0],), sigmas[k] * 1000.0)
    return flow_euler_update(x, trainer.student(x, t, *cond), sigmas[k], sigmas[k + 1])


def pooled_features(trainer: Trainer, x: torch.Tensor, t: float, cond: list[torch.Tensor]) -> torch.Tensor:
    features = trainer.disc.features(x, torch.full((x.shape[0],), t), cond)
    return torch.cat([f.reshape(x.shape[0], -1, f.shape[-1]).mean(1) for f in features], dim=-1)


def probe_accuracy(real: torch.Tensor, fake: torch.Tensor, iterations: int = 500) -> float:
    """Held-out accuracy of an L2-regularised logistic regression, trained on the first half of the pairs."""
    n = real.shape[0]
    half = n // 2
    train = torch.cat([real[:half], fake[:half]])
    test = torch.cat([real[half:], fake[half:]])
    y_train = torch.cat([torch.ones(half), torch.zeros(half)])
    y_test = torch.cat([torch.ones(n - half), torch.zeros(n - half)])
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    w = torch.zeros(train.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    with torch.enable_grad():
        for _ in range(iterations):
            loss = F.binary_cross_entropy_with_logits(train @ w + b, y_train) + 1e-3 * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return ((test @ w + b > 0).float() == y_test).float().mean().item()


def vertical_detail(x: torch.Tensor) -> float:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean().item()


@torch.no_grad()
def probe(trainer: Trainer, samples: torch.Tensor) -> list[dict]:
    latents = trainer.data["latents"]
    sigmas = trainer.schedule.sigmas
    chunks = [samples[i: i + CHUNK] for i in range(0, len(samples), CHUNK)]
    conds = [[trainer.data[n][c] for n in trainer.cond_names] for c in chunks]
    rollout = [latents[c, 0] for c in chunks]
    rows = []
    for k in range(trainer.steps):
        t_next = sigmas[k + 1] * 1000.0
        real = torch.cat([latents[c, k + 1] for c in chunks])
        real_features = torch.cat([pooled_features(trainer, latents[c, k + 1], t_next, cond) for c, cond in zip(chunks, conds)])
        from_key = [student_step(trainer, latents[c, k], k, cond) for c, cond in zip(chunks, conds)]
        rollout = [student_step(trainer, x, k, cond) for x, cond in zip(rollout, conds)]
        for source, fakes in (("key point", from_key), ("own rollout", rollout)):
            fake = torch.cat(fakes)
            fake_features = torch.cat([pooled_features(trainer, x, t_next, cond) for x, cond in zip(fakes, conds)])
            rows.append({"step": f"{k}->{k + 1}", "fake_from": source, "rms": (fake - real).pow(2).mean().sqrt().item(),
                         "probe_accuracy": probe_accuracy(real_features, fake_features),
                         "detail_real": vertical_detail(real), "detail_fake": vertical_detail(fake)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="out/student", help="a `vdopt distill -o` directory with checkpoints")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "distill_reference.yaml"))
    parser.add_argument("--teacher", default=str(ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"))
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--json")
    args = parser.parse_args()

    run = Path(args.run)
    recipe, section, _ = load_distill_recipe(args.recipe)
    teacher = load_teacher(recipe, args.teacher)
    shards = sorted((run / "trajectories").glob("shard_*.safetensors"))
    if not shards:
        raise SystemExit(f"{run}: no trajectories (run `vdopt distill ... -o {run}` first)")
    trainer = Trainer(run, teacher, section, load_trajectories(shards), schedule_for(recipe, section))
    if not trainer.resume():
        raise SystemExit(f"{run}: no checkpoint to probe")
    trainer.model.eval()
    samples = torch.randperm(trainer.samples, generator=torch.Generator().manual_seed(0))[: args.samples]
    rows = probe(trainer, samples)
    print(f"{run} at iteration {trainer.iteration}, {len(samples)} samples")
    print(f"{'step':>6} {'fake from':>12} {'RMS to real':>12} {'feature probe':>14} {'detail real':>12} {'detail fake':>12}")
    for r in rows:
        print(f"{r['step']:>6} {r['fake_from']:>12} {r['rms']:>12.4f} {r['probe_accuracy']:>14.2f} {r['detail_real']:>12.4f} {r['detail_fake']:>12.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "iteration": trainer.iteration, "samples": len(samples), "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
