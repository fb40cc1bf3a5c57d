"""Train the reference teacher on freshly generated moving-shapes clips (train split only).

    python -m vdopt.reference.train --out DIR [--steps 10000] [--minutes 60] [--compile] [--device cpu|cuda] [--seed 0]

Flow matching (``x_s = (1-s) x0 + s noise``, velocity target ``noise - x0``, model timestep
``s * 1000``; the transformer predicts ``x0`` and the loss is taken on the velocity it implies,
see :class:`vdopt.reference.model.ReferenceDenoiser`) with ``s`` three quarters logit-normal
leaning to high noise, one quarter uniform, 10 % prompt dropout to the learned null sequence
(for classifier-free guidance), AdamW with warm-up and a cosine decay over ``--steps``, an EMA
of the weights (the EMA is what gets exported), bf16 autocast on CPU/CUDA.

The run is ``--steps`` optimisation steps (the same model whatever else the machine is doing);
``--minutes`` is a wall-clock cap that stops it early, saying so. A checkpoint (``ckpt.pt``: model,
EMA, optimiser, step, elapsed time) is written every ``--ckpt-every`` seconds and on
exit; running the same command again resumes from it. On exit the EMA weights are written
as ``teacher.safetensors`` + ``config.json`` (see :func:`vdopt.reference.model.save_reference`).
Each batch is ``make_batch(batch, seed=hash(seed, step))``, so a resumed run sees the same
data as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch

from vdopt.data.moving_shapes import ClipConfig, make_batch
from vdopt.reference.model import (
    CONDITIONER_CONFIG, TEACHER_CONFIG, PromptConditioner, ReferenceDenoiser, build_teacher, save_reference, velocity_from_sample,
)


# noise levels: logit-normal around s = sigmoid(0.8) = 0.69, where one coherent object and its
# track are decided (JiT's P_mean -0.8, P_std 0.8 in its clean-at-1 convention); a teacher trained
# centred on s = 0.5 denoised well below s = 0.5 but still painted scattered patches from s = 0.7 up.
# A quarter uniform keeps the clean end covered.
LOGIT_MEAN, LOGIT_STD, UNIFORM_FRAC = 0.8, 0.8, 0.25


def flow_matching_loss(denoiser, conditioner, x0, attrs, generator, drop_prob=0.1, autocast_dtype=None):
    """``denoiser`` is a :class:`ReferenceDenoiser` (or its compiled form)."""
    B = x0.shape[0]
    dev = x0.device
    noise = torch.randn(x0.shape, generator=generator).to(dev)
    s = torch.sigmoid(LOGIT_MEAN + LOGIT_STD * torch.randn(B, generator=generator)).to(dev)
    u = torch.rand(B, generator=generator).to(dev)
    s = torch.where(u < UNIFORM_FRAC, torch.rand(B, generator=generator).to(dev), s)
    drop = (torch.rand(B, generator=generator) < drop_prob).to(dev)
    sb = s.view(B, 1, 1, 1, 1)
    x_t = (1 - sb) * x0 + sb * noise
    # the velocity of the clean clip, clamped below SIGMA_MIN as the prediction is: the loss is
    # |x0_hat - x0|^2 / max(s, SIGMA_MIN)^2, zero for a perfect x0 at every noise level
    target = velocity_from_sample(x_t, x0, s * 1000.0)
    ctx = conditioner.encode_attrs(attrs)
    ctx = torch.where(drop.view(B, 1, 1), conditioner.null(B), ctx)
    with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        pred = denoiser(x_t, s * 1000.0, ctx)
    return (pred.float() - target).pow(2).mean()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vdopt.reference.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (checkpoints + teacher.safetensors)")
    ap.add_argument("--steps", type=int, default=10000, help="optimisation steps; the learning-rate schedule's length")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock cap (total, across resumes)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    ap.add_argument("--ckpt-every", type=float, default=300.0, help="seconds between checkpoints")
    ap.add_argument("--no-bf16", action="store_true", help="train in fp32 instead of bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile the denoiser (~1 min to compile, then ~1.35x faster on the CPU)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)  # parameter init only
    transformer = build_teacher(TEACHER_CONFIG).to(dev)
    conditioner = PromptConditioner(**CONDITIONER_CONFIG).to(dev)
    params = list(transformer.parameters()) + list(conditioner.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema_t = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_c = copy.deepcopy(conditioner).eval().requires_grad_(False)
    step, elapsed, losses = 0, 0.0, []
    ckpt_path = out / "ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=True)
        transformer.load_state_dict(ck["transformer"])
        conditioner.load_state_dict(ck["conditioner"])
        ema_t.load_state_dict(ck["ema_transformer"])
        ema_c.load_state_dict(ck["ema_conditioner"])
        opt.load_state_dict(ck["opt"])
        step, elapsed, losses = ck["step"], ck["elapsed"], ck.get("losses", [])
        print(f"resumed from {ckpt_path}: step {step}, {elapsed / 60:.1f} min done")

    denoiser = ReferenceDenoiser(transformer)
    if args.compile:
        denoiser = torch.compile(denoiser)
    budget = args.minutes * 60.0
    autocast_dtype = None if args.no_bf16 else torch.bfloat16
    clip_cfg = ClipConfig(frames=TEACHER_CONFIG["video_length"], height=TEACHER_CONFIG["sample_size"], width=TEACHER_CONFIG["sample_size"])

    def save_ckpt():
        tmp = out / "ckpt.pt.tmp"
        torch.save(
            {
                "transformer": transformer.state_dict(), "conditioner": conditioner.state_dict(),
                "ema_transformer": ema_t.state_dict(), "ema_conditioner": ema_c.state_dict(),
                "opt": opt.state_dict(), "step": step, "elapsed": elapsed, "losses": losses,
                "args": vars(args),
            },
            tmp,
        )
        os.replace(tmp, ckpt_path)

    def export():
        save_reference(
            ema_t, ema_c, out,
            extra={"training": {"steps": step, "minutes": round(elapsed / 60, 2), "batch": args.batch, "lr": args.lr,
                                "ema": args.ema, "seed": args.seed, "device": args.device,
                                "bf16_autocast": autocast_dtype is not None, "compiled": args.compile,
                                "final_loss_ema": (sum(losses[-100:]) / max(len(losses[-100:]), 1)) if losses else None}},
        )

    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=min(step, args.steps), unit="step", desc="train teacher", mininterval=5)
    last_ckpt = time.time()
    t_prev = time.time()
    transformer.train()
    try:
        while step < args.steps and elapsed < budget:
            frac = step / args.steps
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            data_seed = args.seed * 1_000_003 + step
            batch = make_batch(args.batch, data_seed, split="train", config=clip_cfg)
            gen = torch.Generator().manual_seed(data_seed + 7)
            loss = flow_matching_loss(denoiser, conditioner, batch.video.to(dev), batch.attrs.to(dev), gen,
                                      autocast_dtype=autocast_dtype)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            d = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for src, dst in ((transformer, ema_t), (conditioner, ema_c)):
                    for p, q in zip(src.parameters(), dst.parameters()):
                        q.lerp_(p.detach(), 1 - d)
            step += 1
            losses.append(loss.detach().item())
            now = time.time()
            elapsed += now - t_prev
            t_prev = now
            bar.n = step
            bar.set_postfix(step=step, loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(0)
            if now - last_ckpt > args.ckpt_every:
                save_ckpt()
                export()
                last_ckpt = now
    finally:
        bar.close()
        save_ckpt()
        export()
        (out / "train_log.json").write_text(json.dumps({"step": step, "elapsed_s": elapsed,
                                                          "loss_per_100": [sum(losses[i:i + 100]) / len(losses[i:i + 100]) for i in range(0, len(losses), 100)]}))
        if step < args.steps:
            print(f"stopped at the {args.minutes:g}-minute cap after {step} of {args.steps} steps; "
                  f"run it again with a larger --minutes to continue (the cap counts every resumed run)")
        print(f"wrote {out / 'teacher.safetensors'} after {step} steps, {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
