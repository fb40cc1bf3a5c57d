"""Train the reference teacher on freshly generated moving-shapes clips (train split only).

    python -m vdopt.reference.train --out DIR --minutes 55 [--device cpu|cuda] [--seed 0]

Flow matching (``x_s = (1-s) x0 + s noise``, target ``noise - x0``, model timestep
``s * 1000``) with ``s`` half logit-normal, half uniform, 10 % prompt dropout to the learned null sequence
(for classifier-free guidance), AdamW with warm-up and a time-based cosine decay, an EMA
of the weights (the EMA is what gets exported), bf16 autocast on CPU/CUDA.

The run is bounded by wall-clock minutes, not steps. A checkpoint (``ckpt.pt``: model,
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
from vdopt.reference.model import CONDITIONER_CONFIG, TEACHER_CONFIG, PromptConditioner, build_teacher, save_reference


def flow_matching_loss(transformer, conditioner, x0, attrs, generator, drop_prob=0.1, autocast_dtype=None, uniform_frac=0.5):
    B = x0.shape[0]
    dev = x0.device
    noise = torch.randn(x0.shape, generator=generator).to(dev)
    # noise levels: half logit-normal(0, 1) (the middle, where detail is decided), half uniform
    # (the high-noise end decides layout: one object, where; logit-normal alone starves it)
    s = torch.sigmoid(torch.randn(B, generator=generator)).to(dev)
    u = torch.rand(B, generator=generator).to(dev)
    s = torch.where(u < uniform_frac, torch.rand(B, generator=generator).to(dev), s)
    drop = (torch.rand(B, generator=generator) < drop_prob).to(dev)
    sb = s.view(B, 1, 1, 1, 1)
    x_t = (1 - sb) * x0 + sb * noise
    target = noise - x0
    ctx = conditioner.encode_attrs(attrs)
    ctx = torch.where(drop.view(B, 1, 1), conditioner.null(B), ctx)
    with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        pred = transformer(hidden_states=x_t, timestep=s * 1000.0, encoder_hidden_states=ctx, return_dict=False)[0]
    return (pred.float() - target).pow(2).mean()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vdopt.reference.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (checkpoints + teacher.safetensors)")
    ap.add_argument("--minutes", type=float, default=55.0, help="wall-clock training budget (total, across resumes)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt-every", type=float, default=300.0, help="seconds between checkpoints")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    ap.add_argument("--no-bf16", action="store_true", help="train in fp32 instead of bf16 autocast")
    args = ap.parse_args(argv)

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
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        transformer.load_state_dict(ck["transformer"])
        conditioner.load_state_dict(ck["conditioner"])
        ema_t.load_state_dict(ck["ema_transformer"])
        ema_c.load_state_dict(ck["ema_conditioner"])
        opt.load_state_dict(ck["opt"])
        step, elapsed, losses = ck["step"], ck["elapsed"], ck.get("losses", [])
        print(f"resumed from {ckpt_path}: step {step}, {elapsed / 60:.1f} min done")

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
                                "bf16_autocast": autocast_dtype is not None,
                                "final_loss_ema": (sum(losses[-100:]) / max(len(losses[-100:]), 1)) if losses else None}},
        )

    from tqdm.auto import tqdm

    bar = tqdm(total=int(budget), initial=int(min(elapsed, budget)), unit="s", desc="train teacher", mininterval=5)
    last_ckpt = time.time()
    t_prev = time.time()
    transformer.train()
    try:
        while elapsed < budget and (args.max_steps <= 0 or step < args.max_steps):
            frac = min(elapsed / budget, 1.0)
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            data_seed = args.seed * 1_000_003 + step
            batch = make_batch(args.batch, data_seed, split="train", config=clip_cfg)
            gen = torch.Generator().manual_seed(data_seed + 7)
            loss = flow_matching_loss(transformer, conditioner, batch.video.to(dev), batch.attrs.to(dev), gen,
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
            bar.n = int(min(elapsed, budget))
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
        print(f"wrote {out / 'teacher.safetensors'} after {step} steps, {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
