"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): 3D full attention blocks, no separate temporal blocks."""

from torch import nn

from vdopt.families.base import ArchitectureDescriptor, CondInput, register


class WanDenoiser(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, encoder_hidden_states):
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class WanDescriptor(ArchitectureDescriptor):
    def adapter(self, model: nn.Module) -> nn.Module:
        return WanDenoiser(model)


WAN = register(WanDescriptor(
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
