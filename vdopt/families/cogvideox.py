"""CogVideoX (`CogVideoXTransformer3DModel`): full 3D attention over [text tokens, video tokens].

The module takes latents as [B, F, C, H, W]; the adapter permutes from and to vdopt's
[B, C, F, H, W]. CogVideoX 1.0 (2b) uses 3D sin-cos position embeddings, which diffusers
recomputes from the actual latent sizes when they differ from the sample size, so frames,
height and width stay dynamic. The sin-cos table has `max_text_seq_length` text slots in front
of the video tokens, so the text length must equal `max_text_seq_length` (226 for the published
models, as the pipeline pads). Rotary-embedding checkpoints (5b, 1.5) get their rotary tables
computed inside the adapter as the pipeline does (`_prepare_rotary_positional_embeddings`).
CogVideoX 1.5 patchifies two latent frames at a time (`patch_size_t: 2`), so its frame counts are
multiples of 2 (`ArchitectureDescriptor.multiples`), as its pipeline pads them.
"""

import torch
from torch import nn

from vdopt.families.base import ArchitectureDescriptor, CondInput, register


def resize_crop_region(grid: tuple[int, int], base_width: int, base_height: int):
    """The CogVideoX pipeline's `get_resize_crop_region_for_grid`, restated: importing the pipeline module
    needs `transformers`, which vdopt does not depend on."""
    height, width = grid
    if height / width > base_height / base_width:
        resize_height, resize_width = base_height, int(round(base_height / height * width))
    else:
        resize_height, resize_width = int(round(base_width / width * height)), base_width
    top, left = int(round((base_height - resize_height) / 2.0)), int(round((base_width - resize_width) / 2.0))
    return (top, left), (top + resize_height, left + resize_width)


def with_frames(one_frame: tuple[torch.Tensor, torch.Tensor], head_dim: int, frames) -> tuple[torch.Tensor, torch.Tensor]:
    """The CogVideoX 1.0 rotary table for `frames` frames from the one-frame table: the same values as diffusers'
    `get_3d_rotary_pos_embed(..., temporal_size=frames)`, whose frame grid `linspace(0, T * (T - 1) / T, T)` (exactly
    0..T-1) would make torch.export fix the frame count; here the grid is `arange(T)`."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    time_dim = head_dim // 4
    grid = torch.arange(frames, device=one_frame[0].device, dtype=torch.float32)
    per_frame = get_1d_rotary_pos_embed(time_dim, grid, use_real=True)
    tables = []
    for spatial, temporal in zip(one_frame, per_frame):
        tokens = spatial.shape[0]
        tables.append(torch.cat([temporal[:, None, :].expand(-1, tokens, -1),
                                 spatial[None, :, time_dim:].expand(frames, -1, -1)], dim=-1).flatten(0, 1))
    return tables[0], tables[1]


def rotary_embeddings(config, frames, height, width, device):
    """CogVideoX pipeline's `_prepare_rotary_positional_embeddings`, on latent (not pixel) sizes."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p, p_t = config.patch_size, config.patch_size_t
    grid_height, grid_width = height // p, width // p
    base_width, base_height = config.sample_width // p, config.sample_height // p
    if p_t is None:
        crops = resize_crop_region((grid_height, grid_width), base_width, base_height)
        return with_frames(get_3d_rotary_pos_embed(config.attention_head_dim, crops, grid_size=(grid_height, grid_width),
                                                   temporal_size=1, device=device), config.attention_head_dim, frames)
    base_frames = (frames + p_t - 1) // p_t
    return get_3d_rotary_pos_embed(config.attention_head_dim, None, grid_size=(grid_height, grid_width),
                                   temporal_size=base_frames, grid_type="slice",
                                   max_size=(base_height, base_width), device=device)


def sincos_table(patch_embed, frames: int, height: int, width: int, device=None) -> torch.Tensor:
    """The joint [text slots, video tokens] sin-cos table of `CogVideoXPatchEmbed`, for latent sizes.

    Same values as diffusers' `_get_positional_embeddings`, which builds the table with `new_zeros`
    and then writes `table.data[:, text_len:].copy_(pos)`: `torch.export` cannot trace a write
    through `.data` (the table becomes a fake "lifted" constant). Here the zero text slots are
    concatenated in front instead.
    """
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    pre_compression_frames = (frames - 1) * patch_embed.temporal_compression_ratio + 1
    post_compression_frames = (pre_compression_frames - 1) // patch_embed.temporal_compression_ratio + 1
    pos = get_3d_sincos_pos_embed(patch_embed.embed_dim, (width // patch_embed.patch_size, height // patch_embed.patch_size),
                                  post_compression_frames, patch_embed.spatial_interpolation_scale,
                                  patch_embed.temporal_interpolation_scale, device=device, output_type="pt")
    pos = pos.flatten(0, 1).unsqueeze(0)
    text_slots = pos.new_zeros(1, patch_embed.max_text_seq_length, patch_embed.embed_dim)
    return torch.cat([text_slots, pos], dim=1)


def add_sincos_positions(patch_embed, args, output):
    """Forward hook on the patch embed: adds the sin-cos table computed from the actual latent sizes."""
    _, image_embeds = args
    _, frames, _, height, width = image_embeds.shape
    return output + sincos_table(patch_embed, frames, height, width, output.device).to(output.dtype)


class CogVideoXDenoiser(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        patch_embed = model.patch_embed
        if patch_embed.use_positional_embeddings and not patch_embed.use_learned_positional_embeddings:
            # CogVideoX 1.0 (sin-cos positions). diffusers adds its stored table when the latent has exactly the
            # sample size and recomputes it otherwise (same values either way); under torch.export that size
            # comparison becomes a guard (`height != sample_height`) that would reject the sample size itself, and
            # the recompute writes through `.data`. The adapter moves the addition into a forward hook that always
            # computes the table from the actual sizes: identical numbers, no guard, fully dynamic.
            patch_embed.use_positional_embeddings = False
            patch_embed.register_forward_hook(add_sincos_positions)

    def forward(self, x, t, encoder_hidden_states):
        latents = x.permute(0, 2, 1, 3, 4)  # [B, F, C, H, W]
        rotary = None
        if self.model.config.use_rotary_positional_embeddings:
            rotary = rotary_embeddings(self.model.config, x.shape[2], x.shape[3], x.shape[4], x.device)
        out = self.model(hidden_states=latents, encoder_hidden_states=encoder_hidden_states, timestep=t,
                         image_rotary_emb=rotary, return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4)


COGVIDEOX_2B = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
                    freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=30, dropout=0.0,
                    attention_bias=True, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
                    temporal_compression_ratio=4, max_text_seq_length=226, activation_fn="gelu-approximate",
                    timestep_activation_fn="silu", norm_elementwise_affine=True, norm_eps=1e-5,
                    spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
                    use_rotary_positional_embeddings=False)


class CogVideoXDescriptor(ArchitectureDescriptor):
    def adapter(self, model: nn.Module) -> nn.Module:
        return CogVideoXDenoiser(model)


COGVIDEOX = register(CogVideoXDescriptor(
    family="cogvideox",
    diffusers_class="CogVideoXTransformer3DModel",
    block_pattern=r"transformer_blocks\.\d+",
    time_embedding_pattern=r"time_embedding",
    residual_stream="hidden_states [B, F*H*W/4, D] (video tokens; the text tokens flow alongside as encoder_hidden_states)",
    cond_inputs=(CondInput("encoder_hidden_states", lambda cfg, b, n: (b, n, cfg.get("text_embed_dim", 4096))),),
    patch_size=(1, 2, 2),
    tiny_config=dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=16,
                     text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                     temporal_compression_ratio=4, max_text_seq_length=7, spatial_interpolation_scale=1.875,
                     temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=False),
    full_configs={
        "CogVideoX-2b": COGVIDEOX_2B,
        "CogVideoX-5b": {**COGVIDEOX_2B, "num_attention_heads": 48, "num_layers": 42,
                         "use_rotary_positional_embeddings": True},
    },
))
