"""Latte (`LatteTransformer3DModel`): alternating spatial and temporal transformer blocks.

Latte adds its temporal sin-cos position embedding (`temp_pos_embed`, fixed length
`video_length`) whole to the token sequence, so the diffusers module itself only runs with
F == video_length (or F == 1, where it skips the temporal embedding). The family therefore
exports static frame counts: a bundle holds one `lower.profiles` entry per frame count.

Published Latte checkpoints predict noise *and* a learned variance (`out_channels == 2 *
in_channels`); the diffusers Latte pipeline keeps the first half of the channels
(`noise_pred.chunk(2, dim=1)[0]`) because its DDIM scheduler has no learned variance. The adapter
does the same, so the step program's prediction has the latent's channel count.
"""

from torch import nn

from vdopt.families.base import ArchitectureDescriptor, CondInput, register


class LatteDenoiser(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        in_channels = model.config.in_channels
        self.keep_channels = in_channels if model.out_channels == 2 * in_channels else None

    def forward(self, x, t, encoder_hidden_states):
        out = self.model(hidden_states=x, timestep=t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        if self.keep_channels is not None:  # learned sigma: keep the noise prediction, as the Latte pipeline does
            out = out[:, : self.keep_channels]
        return out


class LatteDescriptor(ArchitectureDescriptor):
    def adapter(self, model: nn.Module) -> nn.Module:
        return LatteDenoiser(model)


LATTE = register(LatteDescriptor(
    family="latte",
    diffusers_class="LatteTransformer3DModel",
    block_pattern=r"transformer_blocks\.\d+",
    temporal_block_pattern=r"temporal_transformer_blocks\.\d+",
    time_embedding_pattern=r"adaln_single\.emb\.timestep_embedder",
    residual_stream="hidden_states [B*F, H*W/4, D] between a spatial block and the next temporal block "
                    "(the temporal blocks see it transposed to [B*H*W/4, F, D])",
    cond_inputs=(CondInput("encoder_hidden_states", lambda cfg, b, n: (b, n, cfg.get("caption_channels", 4096))),),
    patch_size=(1, 2, 2),
    dynamic_frames=False,
    tiny_config=dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                     cross_attention_dim=16, caption_channels=16, attention_bias=True, sample_size=8, patch_size=2,
                     activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                     norm_elementwise_affine=False, norm_eps=1e-6, video_length=4),
    full_configs={
        "Latte-1": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                        cross_attention_dim=1152, caption_channels=4096, attention_bias=True, sample_size=64,
                        patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, video_length=16),
    },
))
