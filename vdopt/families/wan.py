"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): 3D full attention blocks, no separate temporal blocks.

`wan` is text-to-video; `wan_i2v` is Wan 2.1 image-to-video (the same class with `image_dim` and
`added_kv_proj_dim` set), whose first-frame condition is a latent-shaped input.
"""

import torch
from torch import nn

from vdopt.families.base import ArchitectureDescriptor, CondInput, register

CLIP_IMAGE_TOKENS = 257  # the penultimate hidden states of the pipeline's CLIP ViT-H/14 image encoder

WAN = register(ArchitectureDescriptor(
    family="wan",
    diffusers_class="WanTransformer3DModel",
    block_pattern=r"blocks\.\d+",
    time_embedding_pattern=r"condition_embedder\.time_embedder",
    cond_inputs=(CondInput("encoder_hidden_states", lambda cfg, b, n: (b, n, cfg.get("text_dim", 4096))),),
    patch_size=(1, 2, 2),
    tiny_config=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                     text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
                     qk_norm="rms_norm_across_heads"),
    full_configs={
        "Wan2.1-T2V-1.3B": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                                cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024, qk_norm="rms_norm_across_heads"),
    },
))


class WanImageToVideoDenoiser(nn.Module):
    """Wan 2.1 image-to-video, called as its pipeline does: the first-frame condition (the pipeline's 4 mask channels
    and the VAE latent of the image followed by zeros) is concatenated to the noisy latent on channels, and the CLIP
    image embeddings go to the blocks' added key/value projections. Both guidance branches see the same image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, encoder_hidden_states, condition, encoder_hidden_states_image):
        return self.model(hidden_states=torch.cat([x, condition], dim=1), timestep=t,
                          encoder_hidden_states=encoder_hidden_states,
                          encoder_hidden_states_image=encoder_hidden_states_image, return_dict=False)[0]


class WanImageToVideoDescriptor(ArchitectureDescriptor):
    def adapter(self, model: nn.Module) -> nn.Module:
        return WanImageToVideoDenoiser(model)

    def in_channels(self, config: dict) -> int:
        return int(config["out_channels"])  # the noisy latent; in_channels also counts the condition's channels


WAN_I2V = register(WanImageToVideoDescriptor(
    family="wan_i2v",
    diffusers_class="WanTransformer3DModel",
    block_pattern=WAN.block_pattern,
    time_embedding_pattern=WAN.time_embedding_pattern,
    cond_inputs=(
        WAN.cond_inputs[0],
        CondInput("condition", latent_channels=lambda cfg: cfg["in_channels"] - cfg["out_channels"], null="same"),
        CondInput("encoder_hidden_states_image", lambda cfg, b, n: (b, CLIP_IMAGE_TOKENS, cfg["image_dim"]), null="same"),
    ),
    patch_size=WAN.patch_size,
    tiny_config={**WAN.tiny_config, "in_channels": 8, "out_channels": 4, "image_dim": 16, "added_kv_proj_dim": 16},
    full_configs={
        "Wan2.1-I2V-14B-480P": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
                                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                                    cross_attn_norm=True, eps=1e-6, image_dim=1280, added_kv_proj_dim=5120,
                                    rope_max_seq_len=1024, qk_norm="rms_norm_across_heads"),
    },
))
