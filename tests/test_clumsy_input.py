"""Clumsy and hostile input that is not code execution (issue 15): each gets a one-paragraph message
and exit status 2, never a traceback, a hang, or a silently wrong result."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml

from vdopt.cli import main
from vdopt.errors import RecipeError
from vdopt.families.wan import WAN
from vdopt.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
VALID = {"model": {"family": "wan", "input": {"frames": 2, "height": 4, "width": 4}}, "sampler": {"steps": 2}}
BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + k)}: &{chr(98 + k)} [{', '.join([f'*{chr(97 + k)}'] * 9)}]\n" for k in range(9))


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("text, message", [
    (BILLION_LAUGHS, "aliases"),
    (b"model: {family: wan}\n\xff\xfe\n", "not UTF-8"),
    ("[" * 20000 + "]" * 20000, "nested too deeply"),
    (yaml.safe_dump({**VALID, "sampler": {"steps": 2, "guidance_scale": float("inf")}}), "guidance_scale"),
    (yaml.safe_dump({**VALID, "sampler": {"steps": 2, "shift": float("nan")}}), "shift"),
])
def test_bad_recipe_files_are_refused_quickly(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    start = time.perf_counter()
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)
    assert main(["compile", str(path), "-o", str(tmp_path / "out.vdopt")]) == 2
    assert time.perf_counter() - start < 20
    err = capsys.readouterr().err
    assert err.startswith("vdopt compile: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.vdopt").exists()


TEACHER = ROOT / "vdopt/reference/weights/teacher.safetensors"


@pytest.fixture(scope="module")
def reference_recipe(tmp_path_factory) -> Path:
    """The shipped reference recipe at one step on the torch backend (quick to compile and run)."""
    data = load_recipe(ROOT / "recipes" / "reference.yaml").model_dump(mode="json")
    data["sampler"]["steps"] = 1
    data["lower"] = {"backend": "torch"}
    recipe = tmp_path_factory.mktemp("recipe") / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    return recipe


@pytest.fixture(scope="module")
def reference_bundle(reference_recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "b.vdopt"
    assert main(["compile", str(reference_recipe), str(TEACHER), "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("prompt", ["a dog running on the beach 🐶", "   ", "red circle moving sideways", "RED CIRCLE"])
def test_prompts_the_reference_model_does_not_know_list_its_vocabulary(reference_bundle, tmp_path, capsys, prompt):
    out = tmp_path / "clip.gif"
    assert main(["run", str(reference_bundle), "--prompt", prompt, "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "colour in" in err and "'circle'" in err and "'up-left'" in err, err
    assert not out.exists()


@pytest.mark.parametrize("device, message", [("tpu", "cpu or cuda"), ("potato", "not one torch knows"),
                                             pytest.param("cuda", "no CUDA GPU", marks=pytest.mark.skipif(
                                                 torch.cuda.is_available(), reason="this machine has a GPU"))])
def test_devices_vdopt_cannot_run_on_are_refused_before_loading(reference_bundle, tmp_path, capsys, device, message):
    out = tmp_path / "clip.gif"
    assert main(["run", str(reference_bundle), "--prompt", "red circle moving up", "--device", device, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_eval_of_no_prompts_is_refused(capsys):
    assert main(["eval", "--prompts", "0"]) == 2
    assert "at least one clip" in capsys.readouterr().err


def refused(capsys, argv: list[str], message: str, output: Path) -> str:
    """`vdopt ARGV` exits 2 with one line naming `message` (after any progress log), no traceback, nothing at `output`."""
    assert main(argv) == 2
    err = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True) if not line.startswith("[vdopt] "))
    assert err.startswith(f"vdopt {argv[0]}: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert not output.exists()
    return err


WAN_TINY = WAN.tiny_config


@pytest.mark.parametrize("config, message", [
    ({"num_layer": 2}, "unknown key 'num_layer'; did you mean 'num_layers'?"),
    ({"num_layers": -1}, "'num_layers' must be an integer from 1 to"),
    ({"attention_head_dim": 0}, "'attention_head_dim' must be an integer from 1 to"),
    ({"ffn_dim": 10 ** 12}, "'ffn_dim' must be an integer from 1 to 1048576"),
    ({"num_attention_heads": "two"}, "'num_attention_heads' must be an integer, not 'two'"),
    ({"cross_attn_norm": "yes"}, "'cross_attn_norm' must be true or false"),
    ({"eps": float("nan")}, "'eps' must be a finite number"),
    ({"patch_size": [1, -2, 2]}, "'patch_size' must be a list of integers"),
    ({"attention_head_dim": 7}, "cannot be built from this config (AssertionError)"),
])
def test_model_configs_diffusers_would_choke_on_are_named(tmp_path, capsys, config, message):
    recipe = write(tmp_path, yaml.safe_dump({**VALID, "model": {**VALID["model"], "config": {**WAN_TINY, **config}}}))
    out = tmp_path / "out.vdopt"
    err = refused(capsys, ["compile", str(recipe), "-o", str(out)], message, out)
    assert "model.config (WanTransformer3DModel, the wan family)" in err or "cannot be built" in err


@pytest.mark.parametrize("model, message", [
    ({"input": {"frames": {"min": 1, "max": 10 ** 6}, "height": 10 ** 4, "width": 10 ** 4}}, "model.input: one step"),
    ({"input": {"frames": 2, "height": 4, "width": 4, "batch": 10 ** 9}}, "model.input: one step"),
    ({"config": {**WAN_TINY, "num_attention_heads": 1024, "attention_head_dim": 1024}}, "model.config: one step"),
])
def test_sizes_that_would_allocate_terabytes_are_refused_with_the_estimate(tmp_path, capsys, model, message):
    data = {**VALID, "model": {**VALID["model"], **model}}
    data["model"]["input"] = {**VALID["model"]["input"], **model.get("input", {})}
    out = tmp_path / "out.vdopt"
    start = time.perf_counter()
    err = refused(capsys, ["compile", str(write(tmp_path, yaml.safe_dump(data))), "-o", str(out)], message, out)
    assert time.perf_counter() - start < 20
    assert "needs at least" in err and "more than the 1 TiB vdopt compiles for" in err


@pytest.mark.parametrize("data, message", [
    ({**VALID, "model": {"family": "wan", "input": {"frames": 2, "height": 5, "width": 4}}},
     "model.input.height: height 5 is not a multiple of the wan family's patch size 2, so the bundle could never run; use 4 or 6"),
    ({"model": {"family": "latte", "input": {"frames": {"min": 1, "max": 4}, "height": 4, "width": 4}}, "sampler": {"steps": 1},
      "lower": {"profiles": [{"frames": 1, "height": 4, "width": 4}, {"frames": 4, "height": 4, "width": 7}]}},
     "lower.profiles entry {'frames': 4, 'height': 4, 'width': 7}: width 7 is not a multiple"),
])
def test_static_sizes_off_the_patch_grid_are_refused_at_compile(tmp_path, capsys, data, message):
    out = tmp_path / "out.vdopt"
    refused(capsys, ["compile", str(write(tmp_path, yaml.safe_dump(data))), "-o", str(out)], message, out)


def test_a_compile_larger_than_this_machine_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vdopt.validate.physical_memory", lambda: 1 << 10)
    out = tmp_path / "out.vdopt"
    refused(capsys, ["compile", str(write(tmp_path, yaml.safe_dump(VALID))), "-o", str(out)], "this machine has 0.0 GiB", out)


def damaged_teacher(tmp_path: Path, key: str, damage) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(TEACHER))
    state[key] = damage(state[key])
    path = tmp_path / "damaged.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("key, damage, message", [
    ("transformer.proj_out.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("nan")),
     "1 tensor(s) hold NaN or infinite values, first 'proj_out.weight' (64 of 3072)"),
    ("transformer.proj_out.bias", lambda t: t.fill_(float("inf")), "first 'proj_out.bias'"),
    ("transformer.proj_out.weight", lambda t: (t * 100).to(torch.int8),
     "tensor 'proj_out.weight' is torch.int8 where the model has torch.float32 weights"),
    ("conditioner.colour.weight", lambda t: t.fill_(float("nan")), "first 'colour.weight'"),
])
def test_checkpoints_with_nan_inf_or_integer_weights_are_refused(reference_recipe, tmp_path, capsys, key, damage, message):
    out = tmp_path / "out.vdopt"
    refused(capsys, ["compile", str(reference_recipe), str(damaged_teacher(tmp_path, key, damage)), "-o", str(out)], message, out)


def test_a_pt_state_dict_compiles_with_its_prompt_encoder(reference_recipe, reference_bundle, tmp_path):
    from safetensors.torch import load_file

    checkpoint = tmp_path / "teacher.pt"
    torch.save(load_file(str(TEACHER)), checkpoint)
    assert main(["compile", str(reference_recipe), str(checkpoint), "-o", str(tmp_path / "pt.vdopt")]) == 0
    for bundle, clip in ((tmp_path / "pt.vdopt", tmp_path / "pt.pt"), (reference_bundle, tmp_path / "st.pt")):
        assert main(["run", str(bundle), "--prompt", "red circle moving up", "--quiet", "-o", str(clip)]) == 0
    assert torch.equal(torch.load(tmp_path / "pt.pt"), torch.load(tmp_path / "st.pt"))
