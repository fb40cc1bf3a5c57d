"""The project's reference teacher: a pixel-space Latte with an attribute-word prompt encoder.

It is a `LatteTransformer3DModel` (so the Latte block patterns apply unchanged) that predicts the
clean clip; its adapter is `ReferenceDenoiser`, which turns that into the flow velocity, so the
step program sees an ordinary flow denoiser. The checkpoint also holds the prompt conditioner,
which is not part of the step program: a bundle carries it as an extra file, so
`vdopt run --prompt "red circle moving up"` works.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vdopt.data.moving_shapes import COLOURS, DIRECTIONS, SHAPES, parse_prompt
from vdopt.errors import BundleError, RunInputError, first_line
from vdopt.families.base import CondInput, register
from vdopt.families.latte import LATTE, LatteDescriptor
from vdopt.reference.model import CONDITIONER_CONFIG, TEACHER_CONFIG, WEIGHTS_FILE, PromptConditioner, ReferenceDenoiser, build_teacher

TRANSFORMER_PREFIX = "transformer."
CONDITIONER_PREFIX = "conditioner."
EXTRAS = "extras/conditioner.safetensors"
ENCODER_PACKAGE = "extras/prompt_encoder.aoti.pt2"


class EncoderProgram(torch.nn.Module):
    """The prompt encoder as a program a C++ app runs: attribute indices Long[B, 3] (shape, colour, direction)
    -> (cond, uncond) `encoder_hidden_states`. Parsing a prompt into indices is the manifest's vocabulary."""

    def __init__(self, conditioner: PromptConditioner):
        super().__init__()
        self.conditioner = conditioner

    def forward(self, attrs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conditioner.encode_attrs(attrs), self.conditioner.null(attrs.shape[0]).contiguous()


def checkpoint_file(model_path: str | Path) -> Path:
    path = Path(model_path)
    return path / WEIGHTS_FILE if path.is_dir() else path


class ReferenceDescriptor(LatteDescriptor):
    def build(self, config: dict) -> torch.nn.Module:
        return build_teacher(config)

    def in_channels(self, config: dict) -> int:
        """The clip's channels: the transformer's extra input channels are its prompt layout."""
        return int(config.get("out_channels") or config["in_channels"])

    def adapter(self, model: torch.nn.Module) -> torch.nn.Module:
        return ReferenceDenoiser(model)

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not any(k.startswith(TRANSFORMER_PREFIX) for k in state):
            return state
        return {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in state.items() if k.startswith(TRANSFORMER_PREFIX)}

    def write_extras(self, bundle_dir: Path, model_path) -> None:
        if model_path is None:
            return
        from vdopt.capture import read_state_dict  # capture imports the families
        from vdopt.validate import check_weights

        path = checkpoint_file(model_path)
        state = read_state_dict(path)
        conditioner = {k.removeprefix(CONDITIONER_PREFIX): v for k, v in state.items() if k.startswith(CONDITIONER_PREFIX)}
        if conditioner:
            (bundle_dir / EXTRAS).parent.mkdir(exist_ok=True)
            config = dict(CONDITIONER_CONFIG, dim=int(conditioner["colour.weight"].shape[1]))
            check_weights(conditioner, PromptConditioner(**config).state_dict(), path)
            save_file(conditioner, str(bundle_dir / EXTRAS), metadata={"config": json.dumps(config)})

    def write_encoder_package(self, bundle_dir: Path) -> dict | None:
        """The prompt encoder as an AOTInductor package (for C++ apps: `vdopt-run --prompt`), with the vocabulary that
        turns a prompt into its input; None without a conditioner in the bundle."""
        if not (Path(bundle_dir) / EXTRAS).is_file():
            return None
        program = EncoderProgram(self.conditioner(Path(bundle_dir) / EXTRAS)).eval()
        batch = torch.export.Dim("batch", min=1, max=1024)
        ep = torch.export.export(program, (torch.zeros(2, 3, dtype=torch.long),), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(bundle_dir) / ENCODER_PACKAGE))
        return {"file": ENCODER_PACKAGE, "template": "<colour> <shape> moving <direction>", "input": "attrs",
                "attrs": ["shape", "colour", "direction"],
                "vocabulary": {"shape": list(SHAPES), "colour": list(COLOURS), "direction": list(DIRECTIONS)},
                "outputs": ["cond.encoder_hidden_states", "uncond.encoder_hidden_states"]}

    def conditioner(self, path: Path) -> PromptConditioner:
        try:
            with safe_open(str(path), "pt") as f:
                config = json.loads(f.metadata()["config"])
            conditioner = PromptConditioner(**config)
            conditioner.load_state_dict(load_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - safetensors, json and load_state_dict each raise their own types
            raise BundleError(f"{path}: not the prompt conditioner this bundle was written with ({type(exc).__name__}: "
                              f"{first_line(exc)[:120]}); the file was damaged or replaced. Recompile the bundle.") from None
        return conditioner.eval()

    def prompt_encoder(self, bundle_dir: Path, manifest: dict):
        path = Path(bundle_dir) / EXTRAS
        if EXTRAS not in manifest["checksums"] or not path.is_file():
            return None
        conditioner = self.conditioner(path)
        @torch.no_grad()
        def encode(prompts: str | list[str]):
            """One prompt, or a list of prompts for one batched run (one sample each)."""
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            for text in prompts:
                try:
                    parse_prompt(text)
                except ValueError as exc:
                    raise RunInputError(f"{exc}. The reference model knows only prompts '<colour> <shape> moving <direction>' "
                                        f"with colour in {list(COLOURS)}, shape in {list(SHAPES)} and direction in "
                                        f"{list(DIRECTIONS)}, e.g. 'red circle moving up-left'.") from None
            return ({"encoder_hidden_states": conditioner.encode(prompts)},
                    {"encoder_hidden_states": conditioner.null(len(prompts)).contiguous()})

        return encode


REFERENCE = register(ReferenceDescriptor(
    family="reference",
    diffusers_class=LATTE.diffusers_class,
    block_pattern=LATTE.block_pattern,
    temporal_block_pattern=LATTE.temporal_block_pattern,
    time_embedding_pattern=LATTE.time_embedding_pattern,
    residual_stream=LATTE.residual_stream,
    cond_inputs=(CondInput("encoder_hidden_states", lambda cfg, b, n: (b, CONDITIONER_CONFIG["tokens"], cfg["caption_channels"])),),
    patch_size=(1, TEACHER_CONFIG["patch_size"], TEACHER_CONFIG["patch_size"]),
    dynamic_frames=False,
    tiny_config=dict(TEACHER_CONFIG),
    full_configs={"vdopt-reference-teacher": dict(TEACHER_CONFIG)},
))
