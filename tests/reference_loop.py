"""The plain PyTorch sampling loop that compiled bundles are checked against.

It calls the diffusers module directly, with each family's own keyword arguments, and steps with
diffusers' own scheduler: nothing of vdopt's capture, step program or sampler update is used.
"""

from __future__ import annotations

import torch

from vdopt.sampler import diffusers_scheduler


def call_wan(model, x, t, cond):
    return model(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


def call_wan_i2v(model, x, t, cond):
    """As WanImageToVideoPipeline calls it (Wan 2.1): the condition concatenated to the latent on channels."""
    return model(hidden_states=torch.cat([x, cond["condition"]], dim=1), timestep=t,
                 encoder_hidden_states=cond["encoder_hidden_states"],
                 encoder_hidden_states_image=cond["encoder_hidden_states_image"], return_dict=False)[0]


def call_latte(model, x, t, cond):
    out = model(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                enable_temporal_attentions=True, return_dict=False)[0]
    # the Latte pipeline's DDIM has no learned variance: it keeps the first half of the channels
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * x.shape[1] else out


def cogvideox_1_5_rotary(config, frames, height, width):
    """The CogVideoX pipeline's `_prepare_rotary_positional_embeddings` for `patch_size_t` configs (1.5), restated
    on latent sizes (the pipeline module needs `transformers`)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p, p_t = config.patch_size, config.patch_size_t
    return get_3d_rotary_pos_embed(config.attention_head_dim, None, grid_size=(height // p, width // p),
                                   temporal_size=(frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(config.sample_height // p, config.sample_width // p))


def cogvideox_1_0_rotary(config, frames, height, width):
    """The pipeline's rotary table for CogVideoX 1.0 (5b) configs: diffusers' own function at the latent sizes, with
    the pipeline's `get_resize_crop_region_for_grid` restated."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    grid_height, grid_width = height // config.patch_size, width // config.patch_size
    base_height, base_width = config.sample_height // config.patch_size, config.sample_width // config.patch_size
    if grid_height / grid_width > base_height / base_width:
        resize_height, resize_width = base_height, int(round(base_height / grid_height * grid_width))
    else:
        resize_height, resize_width = int(round(base_width / grid_width * grid_height)), base_width
    top, left = int(round((base_height - resize_height) / 2.0)), int(round((base_width - resize_width) / 2.0))
    crops = ((top, left), (top + resize_height, left + resize_width))
    return get_3d_rotary_pos_embed(config.attention_head_dim, crops, grid_size=(grid_height, grid_width),
                                   temporal_size=frames)


def call_cogvideox(model, x, t, cond):
    rotary = None
    if model.config.use_rotary_positional_embeddings:
        rotary_table = cogvideox_1_5_rotary if model.config.patch_size_t is not None else cogvideox_1_0_rotary
        rotary = rotary_table(model.config, *x.shape[2:])
    # CogVideoX takes [B, F, C, H, W]; the reference loop keeps [B, C, F, H, W]
    out = model(hidden_states=x.transpose(1, 2), encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                image_rotary_emb=rotary, return_dict=False)[0]
    return out.transpose(1, 2)


def call_hunyuan_video(model, x, t, cond):
    return model(hidden_states=x, timestep=t.to(x.dtype), encoder_hidden_states=cond["encoder_hidden_states"],
                 encoder_attention_mask=cond["encoder_attention_mask"], pooled_projections=cond["pooled_projections"],
                 guidance=None, return_dict=False)[0]


def pack_ltx(x, p, p_t):
    """diffusers' `LTXPipeline._pack_latents`, restated: the pipeline class needs `transformers`."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f // p_t, p_t, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_ltx(tokens, frames, height, width, p, p_t):
    """diffusers' `LTXPipeline._unpack_latents`, restated."""
    b = tokens.size(0)
    x = tokens.reshape(b, frames, height, width, -1, p_t, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def call_ltx_video(model, x, t, cond):
    _, _, frames, height, width = x.shape
    p, p_t = model.config.patch_size, model.config.patch_size_t
    out = model(hidden_states=pack_ltx(x, p, p_t), encoder_hidden_states=cond["encoder_hidden_states"],
                timestep=t, encoder_attention_mask=cond["encoder_attention_mask"], num_frames=frames // p_t,
                height=height // p, width=width // p, rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)[0]
    return unpack_ltx(out, frames // p_t, height // p, width // p, p, p_t)


def call_reference(model, x, t, cond):
    """The reference teacher's own flow wrapper (prompt layout channels, x-prediction to velocity)."""
    from vdopt.reference.model import ReferenceDenoiser

    return ReferenceDenoiser(model)(x, t, cond["encoder_hidden_states"])


FAMILY_CALLS = {"reference": call_reference, "wan": call_wan, "wan_i2v": call_wan_i2v, "latte": call_latte, "cogvideox": call_cogvideox,
                "hunyuan_video": call_hunyuan_video, "ltx_video": call_ltx_video}


@torch.no_grad()
def reference_sample(family: str, model, sampler, cond: dict, uncond: dict | None, seed: int, shape: tuple[int, ...],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dtype` is the latent's, as a pipeline holds it for a model loaded with that `torch_dtype`."""
    scheduler = diffusers_scheduler(sampler)
    call = FAMILY_CALLS[family]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(dtype)
    for t in scheduler.timesteps:
        if uncond is None:
            prediction = call(model, x, t.expand(x.shape[0]), cond)
        else:
            both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
            out_cond, out_uncond = call(model, torch.cat([x, x]), t.expand(2 * x.shape[0]), both).chunk(2)
            prediction = out_uncond + sampler.guidance_scale * (out_cond - out_uncond)
        x = scheduler.step(prediction, t, x, return_dict=False)[0]
    return x
