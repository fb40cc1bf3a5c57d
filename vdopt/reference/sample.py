"""The reference sampling loop: plain Euler flow matching with classifier-free guidance.

This is the loop every compiled bundle is compared against, so it is deliberately plain:

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift); scheduler.set_timesteps(steps)
    x = randn([B, 3, F, H, W], generator=Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        u, c = ReferenceDenoiser(transformer)(cat([x, x]), t.expand(2B), cat([null, cond])).chunk(2)
        x = scheduler.step(u + g * (c - u), t, x).prev_sample
"""
from __future__ import annotations

import torch

from vdopt.reference.model import DEFAULT_GUIDANCE, DEFAULT_SHIFT, DEFAULT_STEPS, ReferenceDenoiser


def make_scheduler(steps: int, shift: float = DEFAULT_SHIFT):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    return sched


def initial_noise(batch: int, seed: int, frames: int = 8, height: int = 32, width: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn((batch, channels, frames, height, width), generator=torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def sample(
    transformer,
    conditioner,
    prompts: list[str],
    seed: int,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    shift: float = DEFAULT_SHIFT,
    noise: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate ``[B, 3, F, H, W]`` videos in ``[-1, 1]`` (clamped) for ``prompts``.

    The whole batch's initial noise is ``torch.randn(shape, generator=Generator().manual_seed(seed))``
    (or ``noise`` if given). ``guidance_scale == 1`` still runs the batched cond/uncond
    pair, so the arithmetic is the same for every scale.
    """
    cfg = transformer.config
    device = next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    B = len(prompts)
    if noise is None:
        noise = initial_noise(B, seed, cfg.video_length, cfg.sample_size, cfg.sample_size, cfg.out_channels)
    x = noise.to(device=device, dtype=torch.float32)
    cond = conditioner.encode(prompts).to(device=device, dtype=dtype)
    uncond = conditioner.null(B).to(device=device, dtype=dtype)
    context = torch.cat([uncond, cond], dim=0)
    denoiser = ReferenceDenoiser(transformer)
    sched = make_scheduler(steps, shift)
    timesteps = sched.timesteps
    it = timesteps
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(timesteps, desc="sample", leave=False)
    for t in it:
        x_in = torch.cat([x, x], dim=0).to(dtype)
        v = denoiser(x_in, t.expand(2 * B).to(device), context).float()
        v_u, v_c = v.chunk(2, dim=0)
        v = v_u + guidance_scale * (v_c - v_u)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x.clamp(-1.0, 1.0)
