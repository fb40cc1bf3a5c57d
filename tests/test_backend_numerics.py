"""Every family x every CPU backend: the bundle, run by `vdopt run`, matches the plain diffusers loop.

Tiny random-weight configs, fp32, max abs error <= 1e-4, at two frame counts from one bundle.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from reference_loop import reference_sample
from vdopt.cli import main as vdopt_main
from vdopt.families import descriptor_for
from vdopt.recipe import load_recipe

# family -> (sampler, input spec, two latent frame counts, height, width)
CASES = {
    "wan": ({"kind": "flow_euler", "steps": 3, "shift": 3.0, "guidance_scale": 5.0},
            {"frames": {"min": 1, "max": 8}, "height": {"min": 4, "max": 16}, "width": {"min": 4, "max": 16}, "text_len": 7},
            None, (2, 5), 8, 12),
    # Latte's temporal position embedding has a fixed length (video_length=4 in the tiny config): static profiles
    "latte": ({"kind": "ddim", "prediction": "epsilon", "steps": 3, "guidance_scale": 5.0},
              {"frames": {"min": 1, "max": 4}, "height": 8, "width": 8, "text_len": 7},
              [{"frames": 1, "height": 8, "width": 8}, {"frames": 4, "height": 8, "width": 8}], (1, 4), 8, 8),
    # text_len must equal the tiny config's max_text_seq_length (the sin-cos table has that many text slots)
    "cogvideox": ({"kind": "ddim", "prediction": "v_prediction", "steps": 3, "guidance_scale": 6.0},
                  {"frames": {"min": 1, "max": 8}, "height": {"min": 4, "max": 16}, "width": {"min": 4, "max": 16},
                   "text_len": 7},
                  None, (2, 5), 8, 12),
    "hunyuan_video": ({"kind": "flow_euler", "steps": 3, "shift": 7.0, "guidance_scale": 5.0},
                      {"frames": {"min": 1, "max": 8}, "height": {"min": 4, "max": 16}, "width": {"min": 4, "max": 16},
                       "text_len": 7},
                      None, (2, 5), 8, 12),
    "ltx_video": ({"kind": "flow_euler", "steps": 3, "shift": 3.0, "guidance_scale": 3.0},
                  {"frames": {"min": 1, "max": 8}, "height": {"min": 2, "max": 16}, "width": {"min": 2, "max": 16},
                   "text_len": 7},
                  None, (2, 5), 6, 10),
}
BACKENDS = ["torch", "onnx", pytest.param("aoti", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def family_setup(tmp_path_factory):
    """Per family: a random-weight checkpoint, a recipe file writer, and conditioning tensors."""
    made = {}

    def make(family: str):
        if family in made:
            return made[family]
        sampler, spec, profiles, _, _, _ = CASES[family]
        directory = tmp_path_factory.mktemp(family)
        descriptor = descriptor_for(family)
        torch.manual_seed(0)
        model = descriptor.build(dict(descriptor.tiny_config)).eval()
        checkpoint = directory / "model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
        generator = torch.Generator().manual_seed(1)
        cond = descriptor.example_cond(descriptor.tiny_config, 1, spec["text_len"], generator)
        uncond = descriptor.null_cond(cond)
        cond_file = directory / "cond.safetensors"
        save_file({**{f"cond.{k}": v for k, v in cond.items()}, **{f"uncond.{k}": v for k, v in uncond.items()}}, str(cond_file))

        def recipe(backend: str):
            path = directory / f"{backend}.yaml"
            data = {"model": {"family": family, "input": spec}, "sampler": sampler, "lower": {"backend": backend}}
            if profiles:
                data["lower"]["profiles"] = profiles
            path.write_text(yaml.safe_dump(data))
            return path

        made[family] = (directory, checkpoint, cond, uncond, cond_file, recipe)
        return made[family]

    return make


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(CASES))
def test_bundle_matches_diffusers_loop(family, backend, family_setup, tmp_path):
    directory, checkpoint, cond, uncond, cond_file, recipe = family_setup(family)
    _, _, _, frame_counts, height, width = CASES[family]
    recipe_path = recipe(backend)
    bundle = tmp_path / f"{family}.vdopt"
    assert vdopt_main(["compile", str(recipe_path), str(checkpoint), "-o", str(bundle)]) == 0

    descriptor = descriptor_for(family)
    model = descriptor.build(dict(descriptor.tiny_config)).eval()
    model.load_state_dict(load_file(str(checkpoint)))
    recipe_obj = load_recipe(recipe_path)
    for frames in frame_counts:
        out = tmp_path / f"out_{frames}.pt"
        argv = ["run", str(bundle), "--seed", "7", "--cond", str(cond_file), "--frames", str(frames),
                "--height", str(height), "--width", str(width), "--quiet", "-o", str(out)]
        assert vdopt_main(argv) == 0
        got = torch.load(out)
        shape = (1, descriptor.in_channels(descriptor.tiny_config), frames, height, width)
        expected = reference_sample(family, model, recipe_obj.sampler, cond, uncond, 7, shape)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
