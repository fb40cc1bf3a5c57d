"""Reading conditioning files and writing generated video (tensor files, GIF, MP4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vdopt.errors import RunInputError

MIN_VIEW_SIZE = 128
OUTPUT_TYPES = (".pt", ".safetensors", ".gif", ".mp4")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        found = path.is_file()
    except OSError:  # a name too long for the file system, a symlink loop
        found = False
    if not found:
        raise RunInputError(f"{path}: conditioning file not found.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on damaged files
            raise RunInputError(f"{path}: not a readable safetensors file ({type(exc).__name__}).") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise RunInputError(f"{path}: not a tensor file vdopt can read ({type(exc).__name__}); use .safetensors or a .pt dict of tensors.") from None
    if not isinstance(data, dict):
        raise RunInputError(f"{path}: expected a mapping of input names to tensors.")
    return data


def split_cond(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    cond = {k.removeprefix("cond."): v for k, v in tensors.items() if not k.startswith("uncond.")}
    uncond = {k.removeprefix("uncond."): v for k, v in tensors.items() if k.startswith("uncond.")}
    return cond, uncond or None


def load_cond(session, cond_path: str | None, prompt: str | list[str] | None):
    if cond_path:
        return split_cond(read_tensors(cond_path))
    if prompt:
        encoder = session.prompt_encoder()
        if encoder is None:
            raise RunInputError(f"this {session.manifest['family']} bundle carries no prompt encoder; give --cond FILE with "
                                f"{', '.join('cond.' + n for n in session.cond_names)}.")
        return encoder(prompt)
    raise RunInputError(f"give --cond FILE (tensors {', '.join('cond.' + n for n in session.cond_names)}) or --prompt TEXT.")


def to_frames(video: torch.Tensor) -> np.ndarray:
    """[B, C, F, H, W] -> uint8 [F, H, B*W, 3]. Three channels are pixels in [-1, 1]; others are a latent preview."""
    video = video.detach().float().cpu()
    if video.shape[1] == 3:
        rgb = (video.clamp(-1, 1) + 1) / 2
    else:
        rgb = video[:, :3] if video.shape[1] >= 3 else video[:, :1].expand(-1, 3, -1, -1, -1)
        low = rgb.amin(dim=(0, 2, 3, 4), keepdim=True)
        high = rgb.amax(dim=(0, 2, 3, 4), keepdim=True)
        rgb = (rgb - low) / (high - low).clamp(min=1e-6)
    scale = max(1, -(-MIN_VIEW_SIZE // min(rgb.shape[-2:])))
    rgb = rgb.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    frames = rgb.permute(2, 3, 0, 4, 1).reshape(rgb.shape[2], rgb.shape[3], -1, 3)
    return (frames * 255).round().to(torch.uint8).numpy()


def save_output(video: torch.Tensor, path: str | Path, manifest: dict[str, Any] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        torch.save(video, path)
    elif suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"video": video.contiguous()}, str(path))
    elif suffix in (".gif", ".mp4"):
        import imageio.v3 as iio

        frames = to_frames(video)
        try:
            if suffix == ".gif":
                iio.imwrite(path, frames, extension=".gif", duration=125, loop=0)
            else:
                iio.imwrite(path, frames, extension=".mp4", fps=8)
        except Exception as exc:  # noqa: BLE001 - a missing codec plugin is the usual cause
            raise RunInputError(f"{path}: cannot write {suffix} ({exc}); for .mp4 install imageio-ffmpeg, or write .gif/.pt.") from None
    else:
        raise RunInputError(f"{path}: unknown output type '{suffix}'; use {', '.join(OUTPUT_TYPES)}.")
