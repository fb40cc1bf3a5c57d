"""diffusers' cache hooks on the reference teacher (a `LatteTransformer3DModel`), applied as a user would.

FirstBlockCache and MagCache treat a model's block lists as one chain (head block, middle blocks,
tail block). Latte interleaves two lists whose blocks see different layouts (spatial blocks
`[B*F, S, D]`, temporal blocks `[B*S, F, D]`) with the reshapes and the temporal position embedding
in the model's forward between them, so on a stock model they fail ("The size of tensor a (8) must
match the size of tensor b (64)"). `pair_blocks` regroups every (spatial, temporal) pair into one
block that does those reshapes itself, so the model is one chain in one layout: outputs are
bit-identical to the stock model (tests/test_latte_hooks.py), and the chain hooks then apply.
TaylorSeer (whole blocks as cache identifiers: its default identifiers match no Latte attention) and
Pyramid Attention Broadcast (Latte is one of its own models) work on the stock model.

`HOOKS` lists, per hook, a config builder over one knob and the knob values the bench sweeps.
`BlockCounter` counts what actually ran (a block's first norm and an attention's query projection
run only when the hook lets the module compute), so "work skipped" is measured, not assumed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class LattePair(nn.Module):
    """One spatial block and the temporal block after it, with the reshapes Latte's forward does between
    them; takes and returns the spatial layout `[B*F, S, D]`."""

    def __init__(self, spatial: nn.Module, temporal: nn.Module, frames: int, temp_pos_embed: torch.Tensor | None):
        super().__init__()
        self.spatial, self.temporal, self.frames = spatial, temporal, frames
        self.register_buffer("temp_pos_embed", temp_pos_embed, persistent=False)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None):
        h = self.spatial(hidden_states, None, encoder_hidden_states, encoder_attention_mask, timestep, None, None)
        tokens, dim = h.shape[-2], h.shape[-1]
        batch = h.shape[0] // self.frames
        h = h.reshape(batch, -1, tokens, dim).permute(0, 2, 1, 3).reshape(-1, self.frames, dim)
        if self.temp_pos_embed is not None and self.frames > 1:
            h = h + self.temp_pos_embed.to(h.dtype)
        timestep_temp = timestep[::self.frames].repeat_interleave(tokens, dim=0)  # the forward's timestep_temp
        h = self.temporal(h, None, None, None, timestep_temp, None, None)
        return h.reshape(batch, -1, self.frames, dim).permute(0, 2, 1, 3).reshape(-1, tokens, dim)


def register_pair_metadata() -> None:
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    TransformerBlockRegistry.register(LattePair, TransformerBlockMetadata(return_hidden_states_index=0,
                                                                          return_encoder_hidden_states_index=None))


def pair_blocks(model: nn.Module) -> nn.Module:
    """Regroups a `LatteTransformer3DModel`'s blocks into `LattePair`s, in place. The model's forward then
    runs with `enable_temporal_attentions=False`: the pairs run the temporal blocks."""
    frames = model.config.video_length
    pairs = [LattePair(s, t, frames, model.temp_pos_embed if i == 0 else None)
             for i, (s, t) in enumerate(zip(model.transformer_blocks, model.temporal_transformer_blocks))]
    del model.temporal_transformer_blocks
    model.transformer_blocks = nn.ModuleList(pairs)
    model.temporal_transformer_blocks = [None] * len(pairs)  # a plain list: the forward's zip still pairs
    model.forward = functools.partial(type(model).forward, model, enable_temporal_attentions=False)
    register_pair_metadata()
    return model


def latte_of(denoiser: nn.Module) -> nn.Module:
    from diffusers import LatteTransformer3DModel

    return next(m for m in denoiser.modules() if isinstance(m, LatteTransformer3DModel))


class BlockCounter:
    """Counts transformer blocks and attentions that ran, through forward hooks on modules a skipped
    block or attention never calls."""

    def __init__(self, model: nn.Module):
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.attention_processor import Attention

        self.blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
        self.attentions = [m for m in model.modules() if isinstance(m, Attention)]
        self.block_calls = self.attention_calls = 0
        for block in self.blocks:
            block.norm1.register_forward_hook(lambda *_: self.count("block_calls"))
        for attention in self.attentions:
            attention.to_q.register_forward_hook(lambda *_: self.count("attention_calls"))

    def count(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def reset(self) -> None:
        self.block_calls = self.attention_calls = 0


def calibrate_mag_ratios(run_clip: Callable[[], None]) -> list[float]:
    """MagCache's own calibration (`MagCacheConfig(calibrate=True)`): one clip with nothing skipped; the
    hook prints the per-step magnitude ratios, which are parsed as JSON (never evaluated)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_clip()
    lines = [line for line in out.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    if not lines:
        raise RuntimeError("MagCache calibration printed no ratios")
    return [float(v) for v in json.loads(lines[-1])]


@dataclass(frozen=True)
class Hook:
    """A diffusers cache hook with one knob: `config(value, context)` builds its config; `paired`: it needs
    `pair_blocks`; `values`: the knob's sweep, least skipping first."""

    name: str
    knob: str
    values: tuple
    paired: bool
    config: Callable[[object, dict], object]


def fbc_config(threshold, context):
    from diffusers.hooks import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=threshold)


def magcache_config(max_skip_steps: int) -> Callable[[object, dict], object]:
    """MagCache with ratios from its own calibration run (`context["mag_ratios"]`); its default
    `max_skip_steps` is 3, which caps skipping near 60 % on 50 steps."""

    def config(threshold, context):
        from diffusers.hooks import MagCacheConfig

        return MagCacheConfig(threshold=threshold, max_skip_steps=max_skip_steps, num_inference_steps=context["steps"],
                              mag_ratios=context["mag_ratios"])

    return config


def taylorseer_config(interval, context):
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(cache_interval=interval, max_order=1, taylor_factors_dtype=torch.float32,
                                 cache_identifiers=[r"transformer_blocks\.\d+", r"temporal_transformer_blocks\.\d+"])


def pab_config(spatial, context):
    """Pyramid Attention Broadcast: broadcast spatial attention every `spatial` steps, temporal every
    `spatial + 2`, cross attention every `spatial + 4` (the paper's 2-4-6 pattern, shifted), in the
    default timestep window (100, 800). Identifiers anchored: diffusers' default spatial pattern
    `transformer_blocks` also matches `temporal_transformer_blocks`."""
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=spatial, temporal_attention_block_skip_range=spatial + 2,
        cross_attention_block_skip_range=spatial + 4,
        spatial_attention_block_identifiers=(r"^transformer_blocks",), temporal_attention_block_identifiers=(r"^temporal_transformer_blocks",),
        cross_attention_block_identifiers=(r"^transformer_blocks",), current_timestep_callback=context["timestep"])


def magcache_calibration_config(calibrate, context):
    from diffusers.hooks import MagCacheConfig

    return MagCacheConfig(calibrate=calibrate, num_inference_steps=context["steps"])


MAG_CALIBRATION = Hook("diffusers MagCache calibration", "calibrate", (True,), True, magcache_calibration_config)
MAG_THRESHOLDS = (0.02, 0.06, 0.12, 0.24, 0.5, 1.0, 2.0, 4.0)
HOOKS = (
    Hook("diffusers FirstBlockCache", "threshold", (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8), True, fbc_config),
    Hook("diffusers MagCache", "threshold", MAG_THRESHOLDS, True, magcache_config(3)),
    Hook("diffusers MagCache K=10", "threshold", MAG_THRESHOLDS, True, magcache_config(10)),
    Hook("diffusers TaylorSeer", "cache_interval", (2, 3, 4, 5, 6, 8), False, taylorseer_config),
    Hook("diffusers PAB", "spatial skip range", (2, 3, 4, 5, 6, 8, 10, 12), False, pab_config),
)
