"""LTX-Video (`LTXVideoTransformer3DModel`): a DiT over packed tokens with 3D rotary embeddings.

The module takes PACKED latents [B, F/pt * H/p * W/p, C*pt*p*p] plus the latent `num_frames`,
`height`, `width` (for its rotary embedding). The adapter packs vdopt's [B, C, F, H, W] exactly as
`LTXPipeline._pack_latents` does, passes the sizes from `x.shape` (symbolic under export, so
frames/height/width stay dynamic), and unpacks the prediction as `_unpack_latents` does.

`rope_interpolation_scale` is what the pipeline passes for text-to-video latents:
(vae_temporal_compression / frame_rate, vae_spatial_compression, vae_spatial_compression) =
(8 / 25, 32, 32) for the LTX-Video VAE at the default 25 fps. These are adapter attributes.
`encoder_attention_mask` is the T5 tokenizer's mask as the pipeline passes it (bool; null: ones).
"""

import torch
from torch import nn

from vdopt.families.base import ArchitectureDescriptor, CondInput, register


class LTXVideoDenoiser(nn.Module):
    def __init__(self, model: nn.Module, frame_rate: float = 25.0, vae_temporal_compression: int = 8,
                 vae_spatial_compression: int = 32):
        super().__init__()
        self.model = model
        self.rope_interpolation_scale = (vae_temporal_compression / frame_rate, vae_spatial_compression, vae_spatial_compression)

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask):
        p, pt = self.model.config.patch_size, self.model.config.patch_size_t
        b, c, f, h, w = x.shape
        tokens = (x.reshape(b, c, f // pt, pt, h // p, p, w // p, p)
                  .permute(0, 2, 4, 6, 1, 3, 5, 7)
                  .reshape(b, (f // pt) * (h // p) * (w // p), c * pt * p * p))
        out = self.model(hidden_states=tokens, encoder_hidden_states=encoder_hidden_states, timestep=t,
                         encoder_attention_mask=encoder_attention_mask, num_frames=f // pt, height=h // p,
                         width=w // p, rope_interpolation_scale=self.rope_interpolation_scale, return_dict=False)[0]
        out = out.reshape(b, f // pt, h // p, w // p, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(b, out.shape[1], f, h, w)


class LTXVideoDescriptor(ArchitectureDescriptor):
    def adapter(self, model: nn.Module) -> nn.Module:
        return LTXVideoDenoiser(model)


LTX_VIDEO = register(LTXVideoDescriptor(
    family="ltx_video",
    diffusers_class="LTXVideoTransformer3DModel",
    block_pattern=r"transformer_blocks\.\d+",
    time_embedding_pattern=r"time_embed\.emb\.timestep_embedder",
    residual_stream="hidden_states [B, F*H*W, D] (packed video tokens)",
    cond_inputs=(
        CondInput("encoder_hidden_states", lambda cfg, b, n: (b, n, cfg.get("caption_channels", 4096))),
        CondInput("encoder_attention_mask", lambda cfg, b, n: (b, n), dtype=torch.bool, null="ones"),
    ),
    patch_size=(1, 1, 1),  # LTX-Video 0.9 patchifies in its VAE (32x32x8); the transformer's patch size is 1
    tiny_config=dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                     attention_head_dim=8, cross_attention_dim=16, num_layers=2, activation_fn="gelu-approximate",
                     qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6,
                     caption_channels=16, attention_bias=True, attention_out_bias=True),
    full_configs={
        "LTX-Video-0.9": dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                              attention_head_dim=64, cross_attention_dim=2048, num_layers=28,
                              activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
                              norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096,
                              attention_bias=True, attention_out_bias=True),
    },
))
