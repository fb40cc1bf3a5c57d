"""The CMD form of a video model (Yu et al., ICLR 2024): a clip = one content frame + a small motion latent.

`ContentMotionAutoencoder` follows NVlabs/CMD's `ProjectedAutoencoder` in what it computes, with convolutions
where CMD has TimeSformer blocks (a 32 x 32 x 8 clip does not need attention to be encoded):

- content frame: `z_c = sum_t softmax_t(logit)_t * x_t`, the weights per pixel and per channel, so z_c stays an
  image (the image model that generates it understands it). The logits come from the clip and from the encoder's
  features, which see every frame and know each frame's index.
- motion latent: the encoder's features `h [B, D, T, H', W']` averaged over H' and over W', projected to `c` channels
  and concatenated along the last axis: `z_m [B, c, T, 1, W' + H']` (the x-t plane, then the y-t plane). The
  singleton axis lets the motion latent pass for a `[B, C, F, H, W]` latent, which is what a step program takes.
- decoder: the content frame patch-embedded and broadcast over T, plus the x-t plane broadcast over H' and the y-t
  plane over W', through 3-D residual blocks and back to pixels, with the content frame itself as a skip input.

`MotionDiT` is CMD's motion generator: a DiT over the motion latent's tokens with the content frame's patches and the
prompt's tokens in context (CMD conditions adaLN on the timestep only and puts the content frame in context; vdopt
adds the pooled prompt to adaLN, as the prompt is what says the direction). Like the reference teacher it predicts
the clean latent, and `MotionDenoiser` turns that into the flow velocity, so its step program is an ordinary flow
denoiser's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vdopt.reference.model import velocity_from_sample

AUTOENCODER_CONFIG: dict = {"channels": 3, "width": 32, "motion_channels": 4, "patch": 4}
MOTION_CONFIG: dict = {"motion_channels": 4, "content_channels": 3, "width": 64, "depth": 3, "heads": 2,
                       "motion_patch": 2, "content_patch": 8, "text_dim": 64, "frames": 8, "motion_width": 16,
                       "content_size": 32}
MOTION_NOISE_OFFSET = 1_000_003  # the motion loop's sample k starts from the noise of seed `seed + this + k`


def motion_guidance(meta: dict, guidance_scale: float) -> float:
    """The motion loop's guidance scale: the one the CMD weights record (`vdopt distill`'s `cmd.motion_guidance`: the
    motion DiT learnt the teacher's guided samples, which carry the teacher's guidance already), else the sampler's."""
    recorded = meta.get("motion_guidance")
    return guidance_scale if recorded is None else float(recorded)


def sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """`[N] -> [N, dim]` sine-cosine codes (computed in the graph, so any frame count works)."""
    freqs = torch.exp(torch.arange(dim // 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / (dim // 2)))
    angles = positions.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def grid_code(rows: int, cols: int, dim: int, device: torch.device) -> torch.Tensor:
    """`[rows * cols, dim]`: half the channels code the row, half the column."""
    r = sincos(torch.arange(rows, device=device), dim // 2)
    c = sincos(torch.arange(cols, device=device), dim // 2)
    return torch.cat([r[:, None].expand(rows, cols, -1), c[None].expand(rows, cols, -1)], dim=2).reshape(rows * cols, dim)


class ResBlock3d(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, width), nn.Conv3d(width, width, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, width), nn.Conv3d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.gelu(self.norm1(h)))
        return h + self.conv2(F.gelu(self.norm2(y)))


class ContentMotionAutoencoder(nn.Module):
    def __init__(self, channels: int = 3, width: int = 32, motion_channels: int = 4, patch: int = 4):
        super().__init__()
        self.channels, self.width, self.motion_channels, self.patch = channels, width, motion_channels, patch
        self.embed = nn.Conv3d(channels, width, (1, patch, patch), stride=(1, patch, patch))
        self.encoder = nn.Sequential(ResBlock3d(width), ResBlock3d(width))
        self.to_logit = nn.Sequential(nn.Conv3d(channels + width, width // 2, 3, padding=1), nn.GELU(),
                                      nn.Conv3d(width // 2, channels, 3, padding=1))
        self.to_x = nn.Conv2d(width, motion_channels, 1)
        self.to_y = nn.Conv2d(width, motion_channels, 1)
        self.content_embed = nn.Conv2d(channels, width, patch, stride=patch)
        self.from_x = nn.Conv2d(motion_channels, width, 1)
        self.from_y = nn.Conv2d(motion_channels, width, 1)
        self.decoder = nn.Sequential(ResBlock3d(width), ResBlock3d(width), ResBlock3d(width))
        self.unpatch = nn.ConvTranspose3d(width, width // 2, (1, patch, patch), stride=(1, patch, patch))
        self.out = nn.Sequential(nn.Conv3d(width // 2 + channels, width // 2, 3, padding=1), nn.GELU(),
                                 nn.Conv3d(width // 2, channels, 3, padding=1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        frames = grid_code(h.shape[2], 1, self.width, x.device).t()  # [D, T]: each frame's index
        return self.encoder(h + frames[None, :, :, None, None])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`x [B, C, T, H, W] -> (z_c [B, C, H, W], z_m [B, c, T, 1, W/p + H/p])`."""
        h = self.features(x)
        up = F.interpolate(h, size=x.shape[2:], mode="nearest")
        weights = torch.softmax(self.to_logit(torch.cat([x, up], dim=1)), dim=2)
        content = (weights * x).sum(dim=2)
        motion = torch.cat([self.to_x(h.mean(dim=3)), self.to_y(h.mean(dim=4))], dim=3)
        return content, torch.tanh(motion).unsqueeze(3)

    def decoding_modules(self) -> list[nn.Module]:
        """The modules `decode` runs (the decoder stage of `vdopt distill --method cmd` fine-tunes these alone)."""
        return [self.content_embed, self.from_x, self.from_y, self.decoder, self.unpatch, self.out]

    def decode(self, content: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        rows, cols = content.shape[2] // self.patch, content.shape[3] // self.patch
        plane = motion.squeeze(3)
        h = (self.content_embed(content)[:, :, None]
             + self.from_x(plane[..., :cols])[:, :, :, None, :]
             + self.from_y(plane[..., cols:cols + rows])[:, :, :, :, None])
        h = self.unpatch(self.decoder(h))
        frames = h.shape[2]
        return self.out(torch.cat([h, content[:, :, None].expand(-1, -1, frames, -1, -1)], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c))[:, None].chunk(6, dim=2)
        h = self.norm1(tokens) * (1 + scale1) + shift1
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        tokens = tokens + gate1 * self.proj(attn)
        h = self.norm2(tokens) * (1 + scale2) + shift2
        return tokens + gate2 * self.mlp(h)


class MotionDiT(nn.Module):
    """`(z_m [B, c, T, 1, S], timestep [B], prompt tokens [B, L, text_dim], content [B, C, H, W]) -> clean z_m`."""

    def __init__(self, motion_channels: int = 4, content_channels: int = 3, width: int = 64, depth: int = 3, heads: int = 2,
                 motion_patch: int = 2, content_patch: int = 8, text_dim: int = 64, frames: int = 8, motion_width: int = 16,
                 content_size: int = 32):
        super().__init__()
        self.config = dict(motion_channels=motion_channels, content_channels=content_channels, width=width, depth=depth,
                           heads=heads, motion_patch=motion_patch, content_patch=content_patch, text_dim=text_dim,
                           frames=frames, motion_width=motion_width, content_size=content_size)
        self.width, self.motion_patch = width, motion_patch
        self.motion_embed = nn.Linear(motion_channels * motion_patch, width)
        self.content_embed = nn.Conv2d(content_channels, width, content_patch, stride=content_patch)
        self.text_embed = nn.Linear(text_dim, width)
        self.kind = nn.Parameter(torch.zeros(3, width))  # motion, content, text token types
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.text_pool = nn.Linear(text_dim, width)
        self.blocks = nn.ModuleList(DiTBlock(width, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(width, 2 * width)
        self.final = nn.Linear(width, motion_channels * motion_patch)
        nn.init.zeros_(self.final_modulation.weight)
        nn.init.zeros_(self.final_modulation.bias)
        nn.init.normal_(self.kind, std=0.02)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        b, c, frames, _, width = x.shape
        p = self.motion_patch
        columns = width // p
        motion = x.squeeze(3).reshape(b, c, frames, columns, p).permute(0, 2, 3, 1, 4).reshape(b, frames * columns, c * p)
        motion = self.motion_embed(motion) + grid_code(frames, columns, self.width, x.device) + self.kind[0]
        image = self.content_embed(content)
        rows, cols = image.shape[2], image.shape[3]
        image = image.flatten(2).transpose(1, 2) + grid_code(rows, cols, self.width, x.device) + self.kind[1]
        words = self.text_embed(text) + self.kind[2]
        tokens = torch.cat([motion, image, words], dim=1)
        cond = self.time_mlp(sincos(timestep, self.width)) + self.text_pool(text.mean(dim=1))
        for block in self.blocks:
            tokens = block(tokens, cond)
        shift, scale = self.final_modulation(F.silu(cond))[:, None].chunk(2, dim=2)
        out = self.final(self.final_norm(tokens[:, : frames * columns]) * (1 + scale) + shift)
        return out.reshape(b, frames, columns, c, p).permute(0, 3, 1, 2, 4).reshape(b, c, frames, 1, width)


class MotionDenoiser(nn.Module):
    """The motion generator as a flow denoiser: `(z_m, timestep = s * 1000, prompt tokens, content) -> velocity`, the
    content frame as the content loop leaves it, `[B, C, 1, H, W]`."""

    def __init__(self, model: MotionDiT):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        return velocity_from_sample(x, self.model(x, t, encoder_hidden_states, content[:, :, 0]).to(x.dtype), t)


class Decoder(nn.Module):
    """The decode stage's program: `(content [B, C, 1, H, W], motion [B, c, T, 1, S]) -> (clip [B, C, T, H, W],)` (a
    tuple, as every program a bundle runs returns its outputs)."""

    def __init__(self, autoencoder: ContentMotionAutoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, content: torch.Tensor, motion: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.autoencoder.decode(content[:, :, 0], motion),)


# ----- the weights file ------------------------------------------------------------------------

CMD_FILE = "cmd.safetensors"
PREFIXES = ("autoencoder.", "motion.", "content.", "conditioner.")


def save_cmd(path: str | os.PathLike, autoencoder: ContentMotionAutoencoder, motion: MotionDiT, content: dict[str, torch.Tensor],
             conditioner: dict[str, torch.Tensor], info: dict) -> Path:
    """One file: the autoencoder, the motion DiT, the content generator (the teacher's layout, prefixed `content.`)
    and the prompt conditioner; configs in the metadata."""
    from safetensors.torch import save_file

    tensors = {f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()}
    tensors |= {f"motion.{k}": v for k, v in motion.state_dict().items()}
    tensors |= {f"content.{k}": v for k, v in content.items()}
    tensors |= {f"conditioner.{k}": v for k, v in conditioner.items()}
    meta = {"autoencoder": {k: getattr(autoencoder, k) for k in AUTOENCODER_CONFIG}, "motion": motion.config, **info}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"cmd": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_cmd(path: str | os.PathLike) -> tuple[ContentMotionAutoencoder, MotionDiT, dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(autoencoder, motion DiT, content generator state, conditioner state, metadata), models in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("cmd", "null") or "null")
    if not isinstance(meta, dict) or "autoencoder" not in meta or "motion" not in meta:
        raise ValueError(f"{path}: not a CMD weights file (no `cmd` metadata with the autoencoder and motion configs)")
    guidance = meta.get("motion_guidance")
    if guidance is not None and (type(guidance) not in (int, float) or not math.isfinite(guidance) or guidance < 0):
        raise ValueError(f"{path}: the `cmd` metadata's motion_guidance should be a non-negative number, not {guidance!r}")
    state = load_file(str(path))
    part = lambda prefix: {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    autoencoder = ContentMotionAutoencoder(**meta["autoencoder"])
    autoencoder.load_state_dict(part("autoencoder."))
    motion = MotionDiT(**meta["motion"])
    motion.load_state_dict(part("motion."))
    for model in (autoencoder, motion):
        model.eval().requires_grad_(False)
    return autoencoder, motion, part("content."), part("conditioner."), meta
