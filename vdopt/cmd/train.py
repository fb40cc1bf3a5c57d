"""`vdopt distill --method cmd`: the CMD form of a teacher, in resumable stages.

1. `trajectories` (shared with step distillation): the teacher's guided samples for the recipe's prompts and seeds.
2. `autoencoder`: the content-motion autoencoder on the family's own latent space (pixels for the reference model),
   mean squared reconstruction error on a mix of the teacher's samples (under the clip's symmetries: flips,
   transposition, time reversal) and fresh clips of its training distribution (`make_batch`, train split). Every
   CMD clip is decoded from generated latents, so a decoder fitted to real clips alone redraws the teacher's
   outputs worse than it reconstructs real ones.
3. `content`: the content generator, the teacher run at one frame with its temporal blocks removed (at one frame
   a temporal block attends over a single key, so it is only a per-token MLP: removing it halves the stage's cost
   and the fine-tune absorbs it), fine-tuned by flow matching on encoded content frames with the prompt
   (10 % prompt dropout to the null sequence, for guidance).
4. `motion`: the motion DiT by flow matching on the teacher's samples encoded by the autoencoder (a distillation: the
   motion generator never sees real data), the content frame in context, the prompt as conditioning (10 % dropout).
   The samples are taken also under the data's symmetries that keep a prompt a prompt (`under_prompt_symmetries`:
   transposed and rotated circles and squares, the direction remapped, held-out triples left out).
5. `decoder`: the autoencoder's decoder fine-tuned (encoder frozen) on content frames carrying the content generator's
   errors (`with_generator_errors`, `cmd.content_corruption`): every CMD clip is decoded from a generated content
   frame, and a decoder that has only seen encoded ones draws the generator's errors into the clip.
6. `export`: `cmd.safetensors` (EMA weights of every part) and a recipe whose `rewrite_content_motion` pass uses it.

Every training stage checkpoints (`cmd/<stage>/ckpt.pt`: model, EMA, optimiser, iteration) every
`cmd.checkpoint_every` iterations and on a stop, and resumes from it; a finished stage leaves
`cmd/<stage>.safetensors` and is skipped. Batch n of a stage is a pure function of (seed, stage, n), so a resumed
run trains on the same data as an uninterrupted one. Under torchrun each rank takes its share of the batch and
gradients are averaged (`Dist.average_gradients`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from vdopt.cmd.model import ContentMotionAutoencoder, MotionDenoiser, MotionDiT
from vdopt.data.moving_shapes import DIRECTION_VEC, DIRECTIONS, HELD_OUT_COMBOS, SHAPES, Attrs, ClipConfig, make_batch, parse_prompt
from vdopt.distill.common import Dist, DistillError, Teacher, atomic_save, bypass_blocks
from vdopt.distill.config import CMDSection, DistillSection, PruneSpec
from vdopt.reference.model import PromptConditioner, sample_from_velocity
from vdopt.reference.train import flow_matching_loss

STAGES = ("autoencoder", "content", "motion", "decoder")


def stage_weights(out: Path, stage: str) -> Path:
    return out / "cmd" / f"{stage}.safetensors"


def clip_config(teacher: Teacher) -> ClipConfig:
    spec = teacher.recipe.model.input
    return ClipConfig(frames=spec.frames.trace_size, height=spec.height.trace_size, width=spec.width.trace_size)


def conditioner_of(teacher: Teacher) -> PromptConditioner:
    state = {k.removeprefix("conditioner."): v for k, v in teacher.state.items() if k.startswith("conditioner.")}
    if teacher.descriptor.family != "reference" or not state:
        raise DistillError(f"distill --method cmd needs the reference family's prompt conditioner (family "
                           f"{teacher.descriptor.family}); other families have no prompt encoder in vdopt yet.")
    conditioner = PromptConditioner(dim=state["pos"].shape[1], tokens=state["pos"].shape[0])
    conditioner.load_state_dict(state)
    return conditioner.eval().requires_grad_(False)


def content_model(teacher: Teacher) -> tuple[nn.Module, nn.Module, list[str]]:
    """The content generator's starting point: the teacher's weights, temporal blocks bypassed; (model, denoiser,
    the removed blocks' module paths relative to the model)."""
    model, denoiser = teacher.build_copy()
    blocks = [name for name, _ in model.named_modules() if teacher.descriptor.is_temporal_block(name)]
    bypass_blocks(model, teacher.descriptor, PruneSpec(blocks=list(range(len(blocks))), what="temporal"))
    return model, denoiser, blocks


def teacher_samples(data: dict[str, torch.Tensor], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the teacher's samples [N, C, F, H, W], their prompts' attribute indices [N, 3]) from the trajectory shards."""
    attrs = torch.tensor([list(parse_prompt(p)) for p in prompts], dtype=torch.long)
    return data["latents"][:, -1], attrs[data["prompt_ids"]]


class StageTrainer:
    """One stage's loop: `loss(iteration, generator) -> scalar` over `model`'s parameters, AdamW with warm-up and a
    cosine decay, gradient clipping, an EMA (what is exported), checkpoints, resume."""

    def __init__(self, out: Path, name: str, model: nn.Module, loss: Callable[[int, torch.Generator], torch.Tensor],
                 iterations: int, lr: float, section: CMDSection, seed: int, dist: Dist, config: dict | None = None):
        self.out, self.name, self.model, self.loss, self.config = out, name, model, loss, config or {}
        self.iterations, self.lr, self.section, self.seed, self.dist = iterations, lr, section, seed, dist
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.iteration = 0
        self.losses: list[float] = []
        self.ckpt = out / "cmd" / name / "ckpt.pt"

    def save(self) -> None:
        if self.dist.main:
            self.ckpt.parent.mkdir(parents=True, exist_ok=True)
            atomic_save({"iteration": self.iteration, "model": self.model.state_dict(), "ema": self.ema,
                         "opt": self.opt.state_dict(), "losses": self.losses}, self.ckpt)

    def resume(self) -> None:
        """Continues from the stage's checkpoint, if there is one."""
        if self.ckpt.is_file():
            state = torch.load(self.ckpt, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            self.ema, self.iteration, self.losses = state["ema"], state["iteration"], state["losses"]
            self.opt.load_state_dict(state["opt"])

    def lr_at(self, n: int) -> float:
        warmup = min(100, self.iterations // 10 + 1)
        return self.lr * min(1.0, (n + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * n / self.iterations)))

    def run(self, max_iterations: int | None, progress: bool) -> bool:
        """Trains from where `resume` left it to `iterations` (or `max_iterations`); True when the stage is complete."""
        stop = min(self.iterations, max_iterations) if max_iterations is not None else self.iterations
        bar = tqdm(total=self.iterations, initial=self.iteration, desc=f"cmd {self.name}", unit="it",
                   disable=not progress or not self.dist.main, leave=False, mininterval=2)
        self.model.train()
        while self.iteration < stop:
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.iteration)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + STAGES.index(self.name) * 100_003
                                                      + self.iteration * 131 + self.dist.rank)
            loss = self.loss(self.iteration, generator)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.dist.average_gradients(self.params)
            nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            decay = min(self.section.ema_decay, (1 + self.iteration) / (10 + self.iteration))
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    if v.dtype.is_floating_point:
                        self.ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                    else:
                        self.ema[k].copy_(v)
            self.iteration += 1
            self.losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{sum(self.losses[-50:]) / len(self.losses[-50:]):.4f}", refresh=False)
            if self.iteration % self.section.checkpoint_every == 0:
                self.save()
        bar.close()
        self.save()
        self.dist.barrier()
        done = self.iteration >= self.iterations
        if done and self.dist.main:
            save_file({k: v.contiguous() for k, v in self.ema.items()}, str(stage_weights(self.out, self.name)),
                      metadata={"iterations": str(self.iteration), "config": json.dumps(self.config),
                                "final_loss": f"{sum(self.losses[-100:]) / max(1, len(self.losses[-100:])):.6f}"})
        self.dist.barrier()
        return done


def share(batch: int, dist: Dist) -> int:
    if batch % dist.world:
        raise DistillError(f"distill.cmd batch {batch} does not divide among {dist.world} processes.")
    return batch // dist.world


def under_symmetries(clips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`clips [N, C, T, H, W]`, each flipped in x, in y, transposed (square frames) and reversed in time at random:
    still clips of the same distribution, as far as an autoencoder (which never sees the prompt) is concerned."""
    out = []
    for clip, (fx, fy, swap, back) in zip(clips, torch.rand(len(clips), 4, generator=generator) < 0.5):
        dims = [d for d, on in ((3, fx), (2, fy), (1, back)) if on]
        clip = clip.flip(dims) if dims else clip
        out.append(clip.transpose(2, 3) if swap and clip.shape[2] == clip.shape[3] else clip)
    return torch.stack(out)


# The symmetries of moving-shapes clips that keep a clip a clip of a prompt: each maps the clip [C, T, H, W] and the
# direction's (dx, dy). They are the ones that keep the background texture's stripes (sin(fx x + fy y), fx, fy > 0)
# in their family; a triangle (apex up) is kept by none but the identity.
PROMPT_SYMMETRIES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[int, int], tuple[int, int]]]] = {
    "transpose": (lambda clip: clip.transpose(2, 3), lambda dx, dy: (dy, dx)),
    "rotate 180": (lambda clip: clip.flip((2, 3)), lambda dx, dy: (-dx, -dy)),
    "anti-transpose": (lambda clip: clip.flip((2, 3)).transpose(2, 3), lambda dx, dy: (-dy, -dx)),
}
SYMMETRIC_SHAPES = (SHAPES.index("circle"), SHAPES.index("square"))


def under_prompt_symmetries(clips: torch.Tensor, attrs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(clips [N, C, T, H, W], attrs [N, 3])` and their images under `PROMPT_SYMMETRIES` with the direction remapped,
    for the shapes the symmetries keep; an image whose (shape, colour, direction) is a held-out triple is left out, so
    the motion generator still never sees one. The teacher's 720 samples are few for a DiT trained for ~500 epochs."""
    by_vector = {vector: index for index, vector in enumerate(DIRECTION_VEC[d] for d in DIRECTIONS)}
    held_out = set(HELD_OUT_COMBOS)
    out_clips, out_attrs = [clips], [attrs]
    for clip_map, vector_map in PROMPT_SYMMETRIES.values():
        for clip, (shape, colour, direction) in zip(clips, attrs.tolist()):
            image = Attrs(shape, colour, by_vector[vector_map(*DIRECTION_VEC[DIRECTIONS[direction]])])
            if shape in SYMMETRIC_SHAPES and image not in held_out:
                out_clips.append(clip_map(clip)[None])
                out_attrs.append(torch.tensor([image], dtype=attrs.dtype))
    return torch.cat(out_clips), torch.cat(out_attrs)


def train_autoencoder(out: Path, teacher: Teacher, section: CMDSection, samples: torch.Tensor | None, seed: int,
                      dist: Dist) -> StageTrainer:
    autoencoder = ContentMotionAutoencoder(**section.autoencoder)
    config = clip_config(teacher)
    per_rank = share(section.autoencoder_batch, dist)
    from_teacher = 0 if samples is None else round(section.autoencoder_teacher_fraction * per_rank)

    def loss(n: int, generator: torch.Generator) -> torch.Tensor:
        clips = make_batch(per_rank - from_teacher, seed * 7_919 + n * dist.world + dist.rank, split="train", config=config).video
        if from_teacher:
            picks = torch.Generator().manual_seed(seed * 7_937 + n * dist.world + dist.rank)
            chosen = samples[torch.randint(len(samples), (from_teacher,), generator=picks)]
            clips = torch.cat([under_symmetries(chosen, picks), clips])
        return (autoencoder(clips) - clips).pow(2).mean()

    return StageTrainer(out, "autoencoder", autoencoder, loss, section.autoencoder_iterations, section.autoencoder_lr,
                        section, seed, dist)


def frozen_autoencoder(out: Path, section: CMDSection) -> ContentMotionAutoencoder:
    path = stage_weights(out, "autoencoder")
    if not path.is_file():
        raise DistillError(f"{path}: the autoencoder stage has not finished; run it first.")
    autoencoder = ContentMotionAutoencoder(**section.autoencoder)
    autoencoder.load_state_dict(load_file(str(path)))
    return autoencoder.eval().requires_grad_(False)


def train_content(out: Path, teacher: Teacher, section: CMDSection, seed: int, dist: Dist) -> StageTrainer:
    autoencoder = frozen_autoencoder(out, section)
    conditioner = conditioner_of(teacher)
    model, denoiser, _ = content_model(teacher)
    model.requires_grad_(True)
    config = clip_config(teacher)
    per_rank = share(section.content_batch, dist)

    def loss(n: int, generator: torch.Generator) -> torch.Tensor:
        batch = make_batch(per_rank, seed * 7_927 + n * dist.world + dist.rank, split="train", config=config)
        with torch.no_grad():
            frames = autoencoder.encode(batch.video)[0].unsqueeze(2)
        return flow_matching_loss(denoiser, conditioner, frames, batch.attrs, generator)

    return StageTrainer(out, "content", model, loss, section.content_iterations, section.content_lr, section, seed, dist)


def trained_content_denoiser(out: Path, teacher: Teacher) -> nn.Module:
    path = stage_weights(out, "content")
    if not path.is_file():
        raise DistillError(f"{path}: the content stage has not finished; run it first.")
    model, denoiser, _ = content_model(teacher)
    model.load_state_dict(load_file(str(path)))
    return denoiser.eval().requires_grad_(False)


@torch.no_grad()
def with_generator_errors(denoiser: nn.Module, conditioner: PromptConditioner, contents: torch.Tensor, attrs: torch.Tensor,
                          sigma_max: float, guidance: float, generator: torch.Generator) -> torch.Tensor:
    """`contents [B, C, 1, H, W]`, a random half replaced by the content generator's guided estimate of each from it
    noised to a level drawn in [0, sigma_max]: content frames with the errors the generator makes, for the decoder to
    learn from (the noise-conditioning augmentation of cascaded diffusion models)."""
    b = len(contents)
    sigma = (torch.rand(b, generator=generator) * sigma_max).view(b, 1, 1, 1, 1)
    noisy = (1 - sigma) * contents + sigma * torch.randn(contents.shape, generator=generator)
    timestep = sigma.flatten().repeat(2) * 1000.0
    context = torch.cat([conditioner.encode_attrs(attrs), conditioner.null(b)])
    conditional, unconditional = denoiser(torch.cat([noisy, noisy]), timestep, context).split(b)
    estimate = sample_from_velocity(noisy, unconditional + guidance * (conditional - unconditional), timestep[:b])
    clean = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1, 1)
    return torch.where(clean, contents, estimate)


def train_decoder(out: Path, teacher: Teacher, section: CMDSection, samples: tuple[torch.Tensor, torch.Tensor] | None,
                  seed: int, dist: Dist) -> StageTrainer:
    """The autoencoder's decoder fine-tuned, its encoder frozen (so the generators' data stays what they learnt), on
    content frames with the content generator's errors (`with_generator_errors`): the decoder draws every CMD clip
    from a generated content frame, not an encoded one. Batches mix real clips and the teacher's samples (under
    `under_prompt_symmetries`: the estimate needs each clip's prompt) as the autoencoder stage does."""
    autoencoder = frozen_autoencoder(out, section)
    for module in autoencoder.decoding_modules():
        module.requires_grad_(True)
    denoiser, conditioner = trained_content_denoiser(out, teacher), conditioner_of(teacher)
    guidance = teacher.recipe.sampler.guidance_scale
    config = clip_config(teacher)
    per_rank = share(section.autoencoder_batch, dist)
    from_teacher = 0 if samples is None else round(section.autoencoder_teacher_fraction * per_rank)

    def loss(n: int, generator: torch.Generator) -> torch.Tensor:
        batch = make_batch(per_rank - from_teacher, seed * 7_949 + n * dist.world + dist.rank, split="train", config=config)
        clips, attrs = batch.video, batch.attrs
        if from_teacher:
            picks = torch.randint(len(samples[0]), (from_teacher,),
                                  generator=torch.Generator().manual_seed(seed * 7_951 + n * dist.world + dist.rank))
            clips, attrs = torch.cat([samples[0][picks], clips]), torch.cat([samples[1][picks], attrs])
        with torch.no_grad():
            content, motion = autoencoder.encode(clips)
            content = with_generator_errors(denoiser, conditioner, content.unsqueeze(2), attrs, section.content_corruption,
                                            guidance, generator)[:, :, 0]
        return (autoencoder.decode(content, motion) - clips).pow(2).mean()

    return StageTrainer(out, "decoder", autoencoder, loss, section.decoder_iterations, section.decoder_lr, section, seed, dist)


def train_motion(out: Path, teacher: Teacher, section: CMDSection, data: dict[str, torch.Tensor], prompts: list[str],
                 seed: int, dist: Dist, progress: bool) -> StageTrainer:
    autoencoder = frozen_autoencoder(out, section)
    conditioner = conditioner_of(teacher)
    clips, attrs = under_prompt_symmetries(*teacher_samples(data, prompts))
    contents, motions = [], []
    with torch.no_grad():
        for chunk in tqdm(clips.split(64), desc="cmd encode teacher samples", disable=not progress or not dist.main, leave=False):
            content, motion = autoencoder.encode(chunk)
            contents.append(content)
            motions.append(motion)
    contents, motions = torch.cat(contents).unsqueeze(2), torch.cat(motions)
    model = MotionDiT(**{**section.motion, "motion_channels": motions.shape[1], "content_channels": contents.shape[1],
                         "frames": motions.shape[2], "motion_width": motions.shape[4], "content_size": contents.shape[3]})
    denoiser = MotionDenoiser(model)
    per_rank = share(section.motion_batch, dist)

    def loss(n: int, generator: torch.Generator) -> torch.Tensor:
        order = torch.randint(len(motions), (section.motion_batch,), generator=torch.Generator().manual_seed(seed * 7_933 + n))
        mine = order[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        content = contents[mine]
        return flow_matching_loss(lambda x, t, ctx: denoiser(x, t, ctx, content), conditioner, motions[mine], attrs[mine], generator)

    return StageTrainer(out, "motion", model, loss, section.motion_iterations, section.motion_lr, section, seed, dist, model.config)


def run_stage(name: str, out: Path, teacher: Teacher, distill: DistillSection, data_fn: Callable[[], dict], prompts: list[str],
              dist: Dist,
              max_iterations: int | None, progress: bool, log: Callable[[str], None]) -> bool:
    """Runs one training stage unless its weights exist; True when they do afterwards."""
    if stage_weights(out, name).is_file():
        log(f"cmd {name}: done ({stage_weights(out, name)})")
        return True
    section = distill.cmd
    torch.manual_seed(distill.seed * 1_009 + STAGES.index(name))  # the fresh model's initial weights
    if name == "autoencoder":
        samples = teacher_samples(data_fn(), prompts)[0] if section.autoencoder_teacher_fraction else None
        trainer = train_autoencoder(out, teacher, section, samples, distill.seed, dist)
    elif name == "content":
        trainer = train_content(out, teacher, section, distill.seed, dist)
    elif name == "motion":
        trainer = train_motion(out, teacher, section, data_fn(), prompts, distill.seed, dist, progress)
    else:
        samples = under_prompt_symmetries(*teacher_samples(data_fn(), prompts)) if section.autoencoder_teacher_fraction else None
        trainer = train_decoder(out, teacher, section, samples, distill.seed, dist)
    trainer.resume()
    if trainer.iteration:
        log(f"cmd {name}: resuming at iteration {trainer.iteration}/{trainer.iterations} from {trainer.ckpt}")
    done = trainer.run(max_iterations, progress)
    log(f"cmd {name}: {'finished' if done else 'stopped'} at iteration {trainer.iteration}/{trainer.iterations}")
    return done
