"""rewrite_content_motion: the step program becomes CMD's stages (content loop -> motion loop -> decode).

Why: a video denoiser pays for every frame at every step. CMD (Yu et al., ICLR 2024) writes a clip as one content
frame plus a small motion latent: the expensive model runs on one frame, a light DiT generates the motion latent
conditioned on it, and one decode call rebuilds the clip. Nothing in CMD is training-free, so the pass takes the
weights `vdopt distill --method cmd` made (`cmd.safetensors`: autoencoder, motion DiT, content generator, prompt
conditioner) and rewrites the captured program into three step programs:

- `content` (loop): the captured family's own model at one frame with the content generator's weights (the teacher
  fine-tuned on content frames, its temporal blocks removed), the captured program's sampler, steps and guidance;
- `motion` (loop): the motion DiT over the motion latent `[B, c, T, 1, W' + H']`, the content frame as a
  conditioning input fed from the first stage, the same sampler and steps, and the guidance scale the weights record
  for it (`motion_guidance`: the DiT learnt the teacher's guided samples, which carry the teacher's guidance already;
  absent, the sampler's);
- `decode` (call): the autoencoder's decoder, `(content, motion) -> clip`.

The pass returns the content stage's program carrying the other two in `extras["stages"]`, so the passes after it
apply to the content stage (`reduce_steps` with a content student, `insert_cache`); the manifest declares all three.
It must come first: it rebuilds the model from the captured configuration, so a cache or a pruning before it would
be lost (required facts `uncached`, `unpruned`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vdopt.capture import StepModule, export_step, io_specs
from vdopt.cmd.family import MOTION
from vdopt.cmd.model import MOTION_NOISE_OFFSET, Decoder, load_cmd, motion_guidance
from vdopt.families.base import bypass
from vdopt.errors import PassError
from vdopt.pass_manager import Pass, register_fact
from vdopt.program import Stage, StepProgram, TensorSpec


def stage_program(program: StepProgram, denoiser: torch.nn.Module, x: torch.Tensor, conds: dict[str, torch.Tensor],
                  descriptor, config: dict, guidance_scale: float) -> StepProgram:
    """A loop stage: `denoiser` under the captured program's sampler and steps at `guidance_scale`, exported at `x`'s
    sizes (static but for the batch)."""
    sampler = program.recipe.sampler.model_copy(update={"guidance_scale": guidance_scale})
    recipe = program.recipe.model_copy(update={"sampler": sampler})
    table = {k: torch.tensor(v, dtype=torch.float32) for k, v in program.step_table.items()}
    step = StepModule(denoiser.eval().requires_grad_(False), table, sampler.kind, sampler.prediction, sampler.guidance_scale,
                      len(conds), program.guidance)
    cond = list(conds.values())
    uncond = list(descriptor.null_cond(conds).values()) if program.guidance else []
    example = (x, torch.tensor(0, dtype=torch.int64), *cond, *uncond)
    names = ["x", "i", *(f"cond.{k}" for k in conds), *((f"uncond.{k}" for k in conds) if program.guidance else ())]
    dims = {"batch": program.dims["batch"], **{k: (s, s) for k, s in zip(("frames", "height", "width"), x.shape[2:])}}
    ep = export_step(step, example, dims, (1, 1, 1))
    inputs, outputs = io_specs(ep, names, ["x_next"], dims)
    return StepProgram(ep=ep, recipe=recipe, descriptor=descriptor, model_config=config, inputs=inputs,
                       outputs=outputs, state=(), step_table=program.step_table, dims=dims, example_inputs=example,
                       guidance=program.guidance)


def decode_program(program: StepProgram, decoder: Decoder, content: torch.Tensor, motion: torch.Tensor) -> StepProgram:
    """The decode call, at the captured program's batch range and the clip's sizes."""
    dims = dict(program.dims)
    batch = torch.export.Dim("batch", min=dims["batch"][0], max=dims["batch"][1]) if dims["batch"][0] < dims["batch"][1] else None
    shapes = ({0: batch}, {0: batch}) if batch is not None else None
    with torch.no_grad():
        ep = torch.export.export(decoder.eval(), (content, motion), dynamic_shapes=shapes, strict=False)
    (clip,) = decoder(content, motion)
    batch_size = lambda shape: ("batch" if batch is not None else shape[0], *shape[1:])  # noqa: E731
    inputs = (TensorSpec("content", batch_size(tuple(content.shape)), "float32"),
              TensorSpec("motion", batch_size(tuple(motion.shape)), "float32"))
    outputs = (TensorSpec("clip", batch_size(tuple(clip.shape)), "float32"),)
    return StepProgram(ep=ep, recipe=program.recipe, descriptor=MOTION, model_config={}, inputs=inputs, outputs=outputs,
                       state=(), step_table={}, dims=dims, example_inputs=(content, motion), guidance=False)


def content_generator(program: StepProgram, state: dict[str, torch.Tensor], removed: list[str]) -> torch.nn.Module:
    model = bypass(program.descriptor.build(program.model_config), removed)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise PassError(f"rewrite_content_motion: the content generator's weights do not fit the captured "
                        f"{program.descriptor.family} model ({str(exc).splitlines()[0][:200]}).") from None
    return program.descriptor.adapter(model)


def rewrite_content_motion(program: StepProgram, weights: str) -> StepProgram:
    if not Path(weights).is_file():
        raise PassError(f"rewrite_content_motion: weights {weights} not found; `vdopt distill --method cmd` writes cmd.safetensors.")
    if program.extras.get("stages"):
        return program
    try:
        autoencoder, motion, content_state, _, meta = load_cmd(weights)
    except ValueError as exc:
        raise PassError(f"rewrite_content_motion: {exc}.") from None
    x, _, *conds = program.example_inputs
    cond = dict(zip((s.name.removeprefix("cond.") for s in program.inputs if s.name.startswith("cond.")), conds))
    if x.dtype != torch.float32:
        raise PassError("rewrite_content_motion: the CMD form runs in float32 (model.dtype).")
    with torch.no_grad():
        frames, motion_latent = autoencoder.encode(torch.zeros_like(x))
    frames = frames.unsqueeze(2)  # the content loop's latent, [B, C, 1, H, W]
    guidance = program.recipe.sampler.guidance_scale
    content = stage_program(program, content_generator(program, content_state, meta.get("content_removed_blocks", [])),
                            frames, cond, program.descriptor, program.model_config, guidance)
    motion_stage = stage_program(program, MOTION.adapter(motion), torch.zeros_like(motion_latent), {**cond, "content": frames},
                                 MOTION, motion.config, motion_guidance(meta, guidance))
    decode = decode_program(program, Decoder(autoencoder), frames, motion_latent)
    stages = (Stage("motion", "loop", motion_stage, "motion", {"cond.content": "content"}, MOTION_NOISE_OFFSET),
              Stage("decode", "call", decode, "clip", {"content": "content", "motion": "motion"}))
    return content.replace(extras={**program.extras, "stages": stages,
                                   "cmd": {"weights": str(weights), "content_removed_blocks": meta.get("content_removed_blocks", [])}})


@register_fact("staged", "the program is CMD's content stage and carries the motion and decode stages, each an exported "
                         "program whose inputs are the bundle's conditioning or an earlier stage's output")
def staged(program: StepProgram) -> bool:
    stages = program.extras.get("stages") or ()
    outputs = {"content"}
    for stage in stages:
        inputs = {s.name for s in stage.program.inputs}
        if not set(stage.feeds) <= inputs or not set(stage.feeds.values()) <= outputs:
            return False
        outputs.add(stage.output)
    return bool(stages) and stages[-1].kind == "call"


PASS = Pass(name="rewrite_content_motion", run=rewrite_content_motion, doc=__doc__, requires=("uncached", "unpruned"),
            guarantees=("staged",))
