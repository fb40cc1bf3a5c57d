"""HunyuanVideo (`HunyuanVideoTransformer3DModel`): dual-stream then single-stream MM-DiT blocks.

Conditioning: `encoder_hidden_states` [B, L, D] (LLaMA hidden states), `encoder_attention_mask`
[B, L] (the tokenizer's 0/1 mask; int64 here, the module only sums it and casts it; null value:
ones, i.e. every token of the empty prompt attended — zeros would divide by zero in the token
refiner's masked mean) and `pooled_projections` [B, P] (CLIP pooled output).

Guidance embedding: the published HunyuanVideo is guidance-distilled (`guidance_embeds=True`)
and its pipeline passes `guidance = embedded_guidance_scale * 1000` (default scale 6.0). That is
a constant of the compiled program, not a per-run input: the adapter passes
`embedded_guidance_scale * 1000` (attribute, default 6.0) when the model has a guidance embedder,
and None otherwise. The tiny test config sets `guidance_embeds=False`.
"""

import torch
from torch import nn

from vdopt.families.base import ArchitectureDescriptor, CondInput, register


class HunyuanVideoDenoiser(nn.Module):
    def __init__(self, model: nn.Module, embedded_guidance_scale: float = 6.0):
        super().__init__()
        self.model = model
        self.embedded_guidance_scale = embedded_guidance_scale

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask, pooled_projections):
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.embedded_guidance_scale * 1000.0, dtype=x.dtype, device=x.device)
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=encoder_hidden_states,
                          encoder_attention_mask=encoder_attention_mask, pooled_projections=pooled_projections,
                          guidance=guidance, return_dict=False)[0]


class HunyuanVideoDescriptor(ArchitectureDescriptor):
    def adapter(self, model: nn.Module) -> nn.Module:
        return HunyuanVideoDenoiser(model)


HUNYUAN_VIDEO = register(HunyuanVideoDescriptor(
    family="hunyuan_video",
    diffusers_class="HunyuanVideoTransformer3DModel",
    # dual-stream blocks, then single-stream blocks: both carry the residual stream
    block_pattern=r"(?:single_)?transformer_blocks\.\d+",
    # the model's own timestep MLP, not the one inside the text token refiner (context_embedder.time_text_embed)
    time_embedding_pattern=r"(?<!context_embedder\.)time_text_embed\.timestep_embedder",
    residual_stream="hidden_states [B, F*H*W/4, D] (video tokens) with encoder_hidden_states [B, L, D] alongside",
    cond_inputs=(
        CondInput("encoder_hidden_states", lambda cfg, b, n: (b, n, cfg.get("text_embed_dim", 4096))),
        CondInput("encoder_attention_mask", lambda cfg, b, n: (b, n), dtype=torch.int64, null="ones"),
        CondInput("pooled_projections", lambda cfg, b, n: (b, cfg.get("pooled_projection_dim", 768))),
    ),
    patch_size=(1, 2, 2),
    tiny_config=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
                     num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                     qk_norm="rms_norm", guidance_embeds=False, text_embed_dim=16, pooled_projection_dim=8,
                     rope_theta=256.0, rope_axes_dim=(4, 4, 4)),
    full_configs={
        "HunyuanVideo": dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                             num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
                             patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096,
                             pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56)),
    },
))
