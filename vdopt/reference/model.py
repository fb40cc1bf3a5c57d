"""The project's reference teacher: a small pixel-space Latte video transformer.

``LatteTransformer3DModel`` (diffusers) with factorised spatial / temporal blocks works
directly on RGB pixels ``[B, 3, F, 32, 32]`` (no VAE). Prompts from the moving-shapes
data set (``"red circle moving up-left"``) are encoded by :class:`PromptConditioner`:
one learned embedding per attribute word, plus a learned position per slot, giving a
token sequence ``[B, L, D]`` that is fed as ``encoder_hidden_states``. A learned null
sequence is the unconditional branch (classifier-free guidance).

Prompt layout channels: Latte conditions only its spatial blocks on the prompt (cross-attention,
the same for every frame) and tells frames apart only by a sin-cos code added before the first
temporal block, so "up" versus "down" must be composed from the direction token and the frame
index deep in the residual stream. A first teacher without help learned shape and colour but not
direction (23.8 % after 8 518 steps: its clean-clip estimate at pure noise was the same clip for
every direction). :class:`PromptLayout` maps the prompt tokens to a coarse per-frame map
(``LAYOUT_CHANNELS x F x 8 x 8``, upsampled) that is concatenated to the noisy clip as extra
input channels, the way image-to-video models concatenate their conditioning image: the
transformer's ``in_channels`` is 3 + 2 layout channels, its ``out_channels`` 3. The layout
network is a submodule of the transformer (``prompt_layout.*``), so it travels with the
transformer's weights through capture, distillation and export.

Objective: rectified flow, diffusers ``FlowMatchEulerDiscreteScheduler`` convention:
``x_s = (1 - s) * x0 + s * noise``, velocity ``v = noise - x0``, timestep given to the
model ``= s * 1000``. The transformer predicts the *clean clip* ``x0`` and
:class:`ReferenceDenoiser` turns that into the velocity ``(x_s - x0_hat) / max(s, SIGMA_MIN)``
("x-prediction, v-loss", Li & He 2025, "Back to Basics: Let Denoising Generative Models
Denoise"). A pixel-space transformer whose patch (4 x 4 x 3 = 48 values) is nearly as wide as
its tokens (64) cannot carry the noise through to a v- or epsilon-prediction: the first teacher,
trained that way, copied noise structure into its samples (scattered 4x4 blocks). The clean
clip lies on a simple manifold the network can reach. Everything outside this module sees an
ordinary flow (velocity) denoiser.

Weights ship in ``vdopt/reference/weights/teacher.safetensors`` (transformer tensors
prefixed ``transformer.``, conditioner tensors prefixed ``conditioner.``) with
``config.json`` next to it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from vdopt.data.moving_shapes import COLOURS, DIRECTIONS, SHAPES, parse_prompt

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "teacher.safetensors"
CONFIG_FILE = "config.json"

# LatteTransformer3DModel config (diffusers). inner_dim = heads * head_dim = 64;
# patch 4 on 32x32 -> 64 tokens per frame, 8 frames; 4 spatial + 4 temporal blocks.
# Chosen by measurement on the shared 2-core CPU (another job was using most of it):
# 0.53 M parameters (2.1 MB fp32); a batch-16 training step takes ~0.5 s uncontended
# (bf16 autocast, 2 threads) and ~3 s with one contended thread; a width-96 model was
# ~1.4x slower per step for no accuracy the evaluator could need.
TEACHER_CONFIG: dict = {
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 5,  # 3 RGB + 2 prompt-layout channels
    "out_channels": 3,
    "num_layers": 4,
    "dropout": 0.0,
    "cross_attention_dim": 64,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 4,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 64,
    "video_length": 8,
}

CONDITIONER_CONFIG: dict = {"dim": 64, "tokens": 3}
LAYOUT_GRID = 8

# Sampling defaults (see MODEL_CARD.md for how they were chosen)
DEFAULT_GUIDANCE = 3.0
DEFAULT_STEPS = 50
DEFAULT_SHIFT = 1.0
# the noise level below which x-prediction is no longer divided by sigma (JiT's t_eps)
SIGMA_MIN = 0.05


class PromptLayout(nn.Module):
    """Prompt tokens ``[B, L, D]`` -> a per-frame layout map ``[B, C, F, H, W]`` (learned on an
    ``F x grid x grid`` lattice, nearest-upsampled to the clip's size)."""

    def __init__(self, dim: int, tokens: int, frames: int, channels: int, grid: int = LAYOUT_GRID):
        super().__init__()
        self.channels, self.frames, self.grid = channels, frames, grid
        self.net = nn.Sequential(nn.Linear(tokens * dim, dim), nn.GELU(), nn.Linear(dim, channels * frames * grid * grid))

    def forward(self, tokens: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        grid = self.net(tokens.flatten(1)).view(-1, self.channels, self.frames, self.grid, self.grid)
        return nn.functional.interpolate(grid, size=size, mode="nearest")


def layout_channels(config: dict) -> int:
    return int(config["in_channels"]) - int(config.get("out_channels") or config["in_channels"])


def build_teacher(config: dict | None = None):
    """A freshly initialised teacher transformer from a config dict (with its ``prompt_layout``
    submodule when ``in_channels`` exceeds ``out_channels``)."""
    from diffusers import LatteTransformer3DModel

    cfg = dict(TEACHER_CONFIG if config is None else config)
    model = LatteTransformer3DModel(**cfg)
    if model.out_channels != cfg.get("out_channels", cfg["in_channels"]):
        raise RuntimeError("LatteTransformer3DModel did not honour out_channels")
    if layout_channels(cfg) > 0:
        model.prompt_layout = PromptLayout(cfg["caption_channels"], CONDITIONER_CONFIG["tokens"], cfg["video_length"],
                                           layout_channels(cfg))
    return model


class ReferenceDenoiser(nn.Module):
    """The teacher as a flow denoiser: ``(x_s, timestep = s * 1000, context) -> velocity``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        x_in = x
        if hasattr(self.model, "prompt_layout"):
            layout = self.model.prompt_layout(encoder_hidden_states, tuple(x.shape[2:]))
            x_in = torch.cat([x, layout.to(x.dtype)], dim=1)
        x0 = self.model(hidden_states=x_in, timestep=t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return velocity_from_sample(x, x0.to(x.dtype), t)


def _sigma(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    return (timestep.to(x.dtype) / 1000.0).clamp_min(SIGMA_MIN).reshape(-1, *([1] * (x.dim() - 1)))


def velocity_from_sample(x: torch.Tensor, x0: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    return (x - x0) / _sigma(x, timestep)


def sample_from_velocity(x: torch.Tensor, velocity: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The clean sample a denoiser's velocity stands for (the inverse of `velocity_from_sample`)."""
    return x - _sigma(x, timestep) * velocity


class PromptConditioner(nn.Module):
    """Attribute-word prompt encoder: ``[colour, shape, direction]`` -> ``[B, 3, D]``.

    ``encode`` parses prompts with :func:`vdopt.data.moving_shapes.parse_prompt`;
    ``null`` returns the learned unconditional sequence.
    """

    def __init__(self, dim: int = 64, tokens: int = 3):
        super().__init__()
        if tokens != 3:
            raise ValueError("PromptConditioner uses exactly 3 tokens: colour, shape, direction")
        self.dim = dim
        self.colour = nn.Embedding(len(COLOURS), dim)
        self.shape = nn.Embedding(len(SHAPES), dim)
        self.direction = nn.Embedding(len(DIRECTIONS), dim)
        self.pos = nn.Parameter(torch.zeros(tokens, dim))
        self.null_tokens = nn.Parameter(torch.zeros(tokens, dim))
        for e in (self.colour, self.shape, self.direction):
            nn.init.normal_(e.weight, std=1.0)
        nn.init.normal_(self.pos, std=0.2)
        nn.init.normal_(self.null_tokens, std=1.0)

    def encode_attrs(self, attrs: torch.Tensor) -> torch.Tensor:
        """attrs: Long[B, 3] (shape, colour, direction) -> [B, 3, D]."""
        attrs = attrs.to(self.pos.device)
        tok = torch.stack(
            [self.colour(attrs[:, 1]), self.shape(attrs[:, 0]), self.direction(attrs[:, 2])], dim=1
        )
        return tok + self.pos

    def encode(self, prompts: list[str]) -> torch.Tensor:
        attrs = torch.tensor([list(parse_prompt(p)) for p in prompts], dtype=torch.long).reshape(-1, 3)
        return self.encode_attrs(attrs)

    def null(self, batch: int) -> torch.Tensor:
        return (self.null_tokens + self.pos).unsqueeze(0).expand(batch, -1, -1)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts)


def save_reference(transformer, conditioner: PromptConditioner, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``teacher.safetensors`` + ``config.json`` atomically into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v.detach().cpu().contiguous() for k, v in transformer.state_dict().items()}
    tensors.update({f"conditioner.{k}": v.detach().cpu().contiguous() for k, v in conditioner.state_dict().items()})
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    cfg = {
        "transformer": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
        "conditioner": {"dim": conditioner.dim, "tokens": 3},
        "objective": f"flow_matching: x_s=(1-s)x0+s*noise, v=noise-x0, timestep=s*1000; "
                     f"the transformer predicts x0, v=(x_s-x0)/max(s,{SIGMA_MIN})",
        "sampling": {"guidance_scale": DEFAULT_GUIDANCE, "steps": DEFAULT_STEPS, "shift": DEFAULT_SHIFT},
    }
    if extra:
        cfg.update(extra)
    tmpc = out / (CONFIG_FILE + ".tmp")
    tmpc.write_text(json.dumps(cfg, indent=2, default=str))
    os.replace(tmpc, out / CONFIG_FILE)
    return out / WEIGHTS_FILE


def load_reference(weights_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   weights_file: str = WEIGHTS_FILE):
    """Load the shipped (or a given) teacher, or another file of its layout such as the distilled
    ``student.safetensors``: returns ``(transformer, conditioner)`` in eval mode."""
    from safetensors.torch import load_file

    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    wf, cf = d / weights_file, d / CONFIG_FILE
    if not wf.exists() or not cf.exists():
        raise FileNotFoundError(
            f"no reference model in {d} (need {weights_file} and {CONFIG_FILE}); "
            f"train one with `python -m vdopt.reference.train --out {d}`"
        )
    cfg = json.loads(cf.read_text())
    tcfg = {k: v for k, v in cfg["transformer"].items() if k in TEACHER_CONFIG}
    transformer = build_teacher(tcfg)
    conditioner = PromptConditioner(**cfg.get("conditioner", CONDITIONER_CONFIG))
    sd = load_file(str(wf))
    t_sd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    c_sd = {k[len("conditioner."):]: v for k, v in sd.items() if k.startswith("conditioner.")}
    transformer.load_state_dict(t_sd, strict=True)
    conditioner.load_state_dict(c_sd, strict=True)
    transformer.to(device).eval()
    conditioner.to(device).eval()
    for p in list(transformer.parameters()) + list(conditioner.parameters()):
        p.requires_grad_(False)
    return transformer, conditioner
