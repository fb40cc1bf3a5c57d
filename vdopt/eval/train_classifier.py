"""Train the evaluation classifier on real moving-shapes clips.

    python -m vdopt.eval.train_classifier --out vdopt/eval/weights [--minutes 6] [--steps 600]

Trains on all attribute combos (the classifier is the judge, not the thing under test)
with light augmentation (Gaussian noise, blur, brightness jitter), then measures accuracy
on fresh clips whose seeds were never used for training, separately for the seen and the
held-out combos, and writes ``classifier.safetensors`` + ``classifier.json`` (with the
accuracies).
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from vdopt.data.moving_shapes import make_batch
from vdopt.eval.classifier import ShapeClassifier, save_classifier

EVAL_SEED_BASE = 10_000_000  # training batches use seeds < 1e6


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    B = x.shape[0]
    blur = torch.rand(B, generator=g) < 0.3
    if blur.any():
        k = torch.ones(3, 1, 1, 3, 3) / 9.0
        xb = F.conv3d(F.pad(x[blur], (1, 1, 1, 1, 0, 0), mode="replicate"), k, groups=3)
        x = x.clone()
        x[blur] = xb
    gain = 1 + 0.1 * (torch.rand(B, 1, 1, 1, 1, generator=g) * 2 - 1)
    offset = 0.1 * (torch.rand(B, 3, 1, 1, 1, generator=g) * 2 - 1)
    std = 0.15 * torch.rand(B, 1, 1, 1, 1, generator=g)
    return (x * gain + offset + std * torch.randn(x.shape, generator=g)).clamp(-1.2, 1.2)


@torch.no_grad()
def accuracy(model: ShapeClassifier, n: int, seed: int, split: str) -> dict:
    b = make_batch(n, seed, split=split)
    pred, _ = model.predict(b.video)
    acc = (pred == b.attrs).float().mean(0)
    return {"shape": float(acc[0]), "colour": float(acc[1]), "direction": float(acc[2]), "n": n}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vdopt.eval.train_classifier", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--minutes", type=float, default=8.0, help="stop early after this wall-clock budget")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-n", type=int, default=1024)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    from tqdm.auto import tqdm

    t0 = time.time()
    model.train()
    bar = tqdm(range(args.steps), desc="train classifier", mininterval=5)
    step = 0
    for step in bar:
        if time.time() - t0 > args.minutes * 60:
            break
        # warm-up, then cosine decay on whichever runs out first: steps or minutes
        frac = max(step / args.steps, (time.time() - t0) / (args.minutes * 60))
        for grp in opt.param_groups:
            grp["lr"] = args.lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        b = make_batch(args.batch, args.seed * 1_000_003 + step, split="all")
        g = torch.Generator().manual_seed(step)
        s, c, d, _ = model(augment(b.video, g))
        loss = F.cross_entropy(s, b.attrs[:, 0]) + F.cross_entropy(c, b.attrs[:, 1]) + F.cross_entropy(d, b.attrs[:, 2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
    model.eval()
    acc = {
        "seen": accuracy(model, args.eval_n, EVAL_SEED_BASE + 1, "train"),
        "held_out": accuracy(model, args.eval_n, EVAL_SEED_BASE + 2, "held_out"),
    }
    minutes = (time.time() - t0) / 60
    save_classifier(model, args.out, extra={"accuracy_on_fresh_real_clips": acc, "steps": step + 1,
                                            "minutes": round(minutes, 2), "batch": args.batch, "seed": args.seed})
    print(f"classifier: {step + 1} steps in {minutes:.1f} min; accuracy {acc}")
    return acc


if __name__ == "__main__":
    main()
