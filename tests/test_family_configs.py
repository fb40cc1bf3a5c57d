"""Family configs beyond the tiny test ones: CogVideoX 1.5 (two-frame temporal patches, rotary positions)
without `transformers`, and the compile-time check of the ranges torch.export actually kept."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reference_loop import reference_sample
from vdopt.capture import capture
from vdopt.compiler import compile_bundle
from vdopt.errors import CaptureError, RecipeError, RunInputError
from vdopt.families import descriptor_for
from vdopt.recipe import parse_recipe
from vdopt.runtime.session import Session

COGVIDEOX_1_5 = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
                     text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                     patch_size_t=2, patch_bias=False, temporal_compression_ratio=4, max_text_seq_length=7,
                     use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False)
SAMPLER = {"kind": "ddim", "prediction": "v_prediction", "steps": 3, "guidance_scale": 6.0}
COND = {"encoder_hidden_states": torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(1))}
UNCOND = {"encoder_hidden_states": torch.zeros(1, 7, 16)}


def saved_model(family: str, config: dict, directory: Path) -> tuple[Path, torch.nn.Module]:
    """A seeded random-weight model of `config` and its safetensors file."""
    torch.manual_seed(0)
    model = descriptor_for(family).build(config).eval()
    path = directory / f"{family}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def check_cogvideox_frames(config: dict, frames_range: dict, frame_counts: tuple[int, ...], directory: Path) -> Session:
    """Compiles `config` with dynamic frames and checks each frame count against the eager loop."""
    checkpoint, model = saved_model("cogvideox", config, directory)
    recipe = parse_recipe({"model": {"family": "cogvideox", "config": config,
                                     "input": {"frames": frames_range, "height": 8, "width": 8, "text_len": 7}},
                           "sampler": SAMPLER})
    compile_bundle(recipe, checkpoint, directory / "bundle")
    session = Session(directory / "bundle")
    for frames in frame_counts:
        got = session.run(COND, UNCOND, seed=5, frames=frames, progress=False)
        expected = reference_sample("cogvideox", model, recipe.sampler, COND, UNCOND, 5, (1, 4, frames, 8, 8))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    return session


def recipe(frames):
    return parse_recipe({"model": {"family": "cogvideox", "config": COGVIDEOX_1_5,
                                   "input": {"frames": frames, "height": 8, "width": 8, "text_len": 7}},
                         "sampler": SAMPLER})


@pytest.fixture
def without_transformers(monkeypatch):
    """`import transformers` fails, as on a machine without it (vdopt does not depend on it)."""
    real_import = builtins.__import__

    def refuse(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] == "transformers":
            raise ModuleNotFoundError("No module named 'transformers'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", refuse)


def test_cogvideox_1_5_compiles_with_dynamic_frames_in_twos_and_matches_the_eager_loop(tmp_path, without_transformers):
    """Regression: the adapter imported the CogVideoX pipeline module (needs transformers), and the frame
    multiple was taken as 1 instead of the config's patch_size_t 2."""
    session = check_cogvideox_frames(COGVIDEOX_1_5, {"min": 4, "max": 8}, (4, 6, 8), tmp_path)
    assert session.manifest["latent"]["multiples"] == [2, 2, 2]
    assert session.manifest["inputs"][0]["shape"][2] == "2*frames_units"
    with pytest.raises(RunInputError, match="frames=5 is not a multiple of 2"):
        session.run(COND, UNCOND, frames=5, progress=False)


def test_cogvideox_1_0_rotary_keeps_frames_dynamic_and_matches_the_eager_loop(tmp_path):
    """Regression: diffusers' rotary frame grid `linspace(0, T * (T - 1) / T, T)` made export fix the frame count
    (CogVideoX-5b could not take dynamic frames)."""
    session = check_cogvideox_frames({**COGVIDEOX_1_5, "patch_size_t": None, "patch_bias": True}, {"min": 1, "max": 6},
                                     (1, 3, 6), tmp_path)
    assert session.manifest["inputs"][0]["shape"][2] == "frames"


def test_a_range_torch_export_narrowed_is_a_compile_error():
    """The rotary table broadcasts a one-patch frame axis, so export keeps frames >= 4 only: the recipe's 2..8
    is refused at compile time, not by a `Guard failed` when a user runs 2 frames."""
    with pytest.raises(CaptureError, match=r"model.input.frames: the exported cogvideox step takes frames 4\.\.8 only, "
                                           r"not the 2\.\.8"):
        capture(recipe({"min": 2, "max": 8}), None)


def test_an_odd_static_frame_count_is_refused_for_two_frame_patches():
    with pytest.raises(RecipeError, match="frames 5 is not a multiple of the cogvideox family's patch size 2"):
        capture(recipe(5), None)


def test_wan_image_to_video_takes_a_latent_shaped_condition_and_matches_the_eager_loop(tmp_path, wan_i2v_checkpoint):
    """Latent-shaped conditioning: the first-frame condition has the latent's frames, height and width (dynamic with
    them); both guidance branches see the same image (null rule `same`, from the manifest)."""
    checkpoint, model = wan_i2v_checkpoint
    recipe = parse_recipe({"model": {"family": "wan_i2v", "input": {"frames": {"min": 1, "max": 5}, "height": {"min": 4, "max": 8},
                                                                     "width": 4, "text_len": 4}},
                           "sampler": {"kind": "flow_euler", "steps": 3, "shift": 3.0, "guidance_scale": 5.0}})
    manifest = compile_bundle(recipe, checkpoint, tmp_path / "bundle")
    condition = next(s for s in manifest["inputs"] if s["name"] == "cond.condition")
    assert condition["shape"] == [1, 4, "frames", "2*height_units", 4]
    assert manifest["null_cond"] == {"encoder_hidden_states": "zeros", "condition": "same",
                                     "encoder_hidden_states_image": "same"}
    session = Session(tmp_path / "bundle")
    descriptor = descriptor_for("wan_i2v")
    for frames, height in ((2, 4), (5, 8)):
        cond = descriptor.example_cond(descriptor.tiny_config, 1, 4, torch.Generator().manual_seed(frames),
                                       latent=(frames, height, 4))
        got = session.run(cond, seed=2, frames=frames, height=height, progress=False)
        uncond = {**cond, "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
        expected = reference_sample("wan_i2v", model, recipe.sampler, cond, uncond, 2, (1, 4, frames, height, 4))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    wrong = {**cond, "condition": cond["condition"][:, :, :1]}
    with pytest.raises(RunInputError, match="'cond.condition' has shape"):
        session.run(wrong, frames=5, height=8, progress=False)


@pytest.fixture
def wan_i2v_checkpoint(tmp_path):
    return saved_model("wan_i2v", dict(descriptor_for("wan_i2v").tiny_config), tmp_path)


@pytest.fixture(scope="module")
def hunyuan_checkpoint(tmp_path_factory):
    return saved_model("hunyuan_video", dict(descriptor_for("hunyuan_video").tiny_config), tmp_path_factory.mktemp("hunyuan"))[0]


@pytest.mark.parametrize("backend, split", [("onnx", "always"), ("aoti", "never"), ("torch", "always")])
def test_hunyuan_cached_with_a_dynamic_batch_gathers_rows_on_every_backend(hunyuan_checkpoint, tmp_path, backend, split):
    """Regression: HunyuanVideo's body reads a size that is a product of two latent dims; closed over by torch.cond's
    branches it failed export (LazyProxy), so a dynamic batch could not be cached. On AOTInductor, its probe state came
    back as a transposed view and was read in the wrong order the next step (distance 1.47 where torch had 0.3); a
    split step could not name the batch; the torch backend's signature check failed on an unbounded size."""
    descriptor = descriptor_for("hunyuan_video")
    dims = {"frames": {"min": 1, "max": 8}, "height": {"min": 4, "max": 16}, "width": {"min": 4, "max": 16}}
    outputs = {}
    for name, options in (("reference", {"backend": "torch", "split_conditionals": "never"}),
                          (backend, {"backend": backend, "split_conditionals": split})):
        recipe = parse_recipe({"model": {"family": "hunyuan_video", "input": {**dims, "batch": {"min": 1, "max": 2},
                                                                               "text_len": 7}},
                               "sampler": {"steps": 6},
                               "passes": [{"name": "insert_cache", "params": {"policy": "first_blocks", "threshold": 0.3}}],
                               "lower": options})
        manifest = compile_bundle(recipe, hunyuan_checkpoint, tmp_path / name)
        assert manifest["cache"]["gather_rows"] is True
        cond = descriptor.example_cond(descriptor.tiny_config, 2, 7, torch.Generator().manual_seed(1))
        computed = []
        latent = Session(tmp_path / name).run(cond, seed=0, frames=3, height=8, width=6, progress=False,
                                              on_step=lambda i, state: computed.append(state[-2].tolist()))
        outputs[name] = latent, computed
    (reference, reference_computed), (got, got_computed) = outputs["reference"], outputs[backend]
    assert got_computed == reference_computed
    assert len(set(reference_computed[-1])) > 1 and min(reference_computed[-1]) < 6, "rows decided differently"
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)
