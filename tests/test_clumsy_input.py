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
    (yaml.safe_dump({**VALID, "model": {**VALID["model"], "dtype": "bfloat16"}, "lower": {"backend": "onnx"}}), "no bfloat16 kernels"),
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


def cond_file(tmp_path: Path, value) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "cond.safetensors"
    save_file({"cond.encoder_hidden_states": value}, str(path))
    return path


@pytest.mark.parametrize("value, message", [
    (torch.full((1, 3, 64), float("nan")), "'cond.encoder_hidden_states' has 192 NaN or infinite value(s) of 192"),
    (torch.zeros(1, 3, 64).index_fill(2, torch.tensor([5]), float("-inf")), "has 3 NaN or infinite value(s)"),
    (torch.ones(1, 3, 64, dtype=torch.int8), "'cond.encoder_hidden_states' is torch.int8; this bundle takes torch.float32"),
])
def test_cond_tensors_with_nan_inf_or_integers_are_refused_before_the_first_step(reference_bundle, tmp_path, capsys, monkeypatch, value, message):
    monkeypatch.setattr("vdopt.runtime.session.Session.initial_noise", lambda *a: pytest.fail("a step ran"))
    out = tmp_path / "clip.gif"
    refused(capsys, ["run", str(reference_bundle), "--cond", str(cond_file(tmp_path, value)), "-o", str(out)], message, out)


def test_a_clip_that_comes_out_nan_is_not_written(reference_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vdopt.runtime.session.Session.run", lambda *a, **k: torch.full((1, 3, 8, 32, 32), float("nan")))
    out = tmp_path / "clip.pt"
    refused(capsys, ["run", str(reference_bundle), "--prompt", "red circle moving up", "-o", str(out)],
            "the generated video has 24576 NaN or infinite value(s)", out)


@pytest.mark.parametrize("argv, message", [
    (["run", "BUNDLE", "--seed", "-1"], "--seed -1: a seed is an integer from 0 to 9223372036854775807"),
    (["run", "BUNDLE", "--seed", str(2 ** 64)], "a seed is an integer from 0 to"),
    (["eval", "--seed", str(2 ** 31)], "--seed 2147483648: a seed is an integer from 0 to 2147483647"),
    (["calibrate", "r.yaml", "--seed", "-5"], "--seed -5: a seed is an integer from 0 to 2147483647"),
])
def test_seeds_out_of_range_are_refused(reference_bundle, tmp_path, capsys, argv, message):
    argv = [str(reference_bundle) if a == "BUNDLE" else a for a in argv]
    out = tmp_path / "out.pt"
    refused(capsys, [*argv, "-o", str(out)] if argv[0] != "eval" else argv, message, out)


def test_a_distill_seed_out_of_range_is_a_recipe_error(tmp_path):
    from vdopt.distill.config import load_distill_recipe

    path = write(tmp_path, yaml.safe_dump({**VALID, "distill": {"seed": -1}}))
    with pytest.raises(RecipeError, match="distill.seed"):
        load_distill_recipe(path)


@pytest.mark.parametrize("output, extra, message", [
    ("DIR", [], "-o DIR: is a directory"),
    ("clip.avi", [], "unknown output type '.avi'; use .pt, .safetensors, .gif, .mp4"),
    ("FILE/clip.gif", [], "FILE is a file, not a directory"),
    ("clip.gif", ["--trace", "FILE/t.json"], "--trace"),
    ("clip.gif", ["--trace", "trace.txt"], "unknown output type '.txt'; use .json"),
    pytest.param("clip.mp4", [], "writing .mp4 needs imageio-ffmpeg", marks=pytest.mark.skipif(
        any(__import__("importlib").util.find_spec(m) for m in ("imageio_ffmpeg", "av")), reason="an mp4 writer is installed")),
])
def test_run_output_paths_are_checked_before_the_bundle_is_opened(reference_bundle, tmp_path, capsys, monkeypatch, output, extra, message):
    monkeypatch.setattr("vdopt.runtime.session.Session.__init__", lambda *a, **k: pytest.fail("the bundle was opened"))
    (tmp_path / "FILE").write_text("mine")
    (tmp_path / "DIR").mkdir()
    names = {"DIR": str(tmp_path / "DIR"), "FILE": str(tmp_path / "FILE")}
    output, extra = (str(tmp_path / output) if output not in names else names[output]), [e.replace("FILE", names["FILE"]) for e in extra]
    err = refused(capsys, ["run", str(reference_bundle), "--prompt", "red circle moving up", "-o", output, *extra], message.replace("DIR", names["DIR"]),
                  tmp_path / "clip.gif")
    assert (tmp_path / "FILE").read_text() == "mine" and not any((tmp_path / "DIR").iterdir()), err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--json", "DIR"], "--json DIR: is a directory"),
    (["eval", "--sheet", "FILE/sheet.png"], "FILE is a file, not a directory"),
    (["calibrate", "r.yaml", "-o", "FILE/cal.yaml"], "FILE is a file, not a directory"),
    (["calibrate", "r.yaml", "-o", "cal.yaml", "--json", "DIR"], "--json DIR: is a directory"),
])
def test_eval_and_calibrate_outputs_are_checked_before_any_clip(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr("vdopt.calibrate.calibrate", lambda *a, **k: pytest.fail("calibration ran"))
    monkeypatch.setattr("vdopt.eval.suite.evaluate", lambda *a, **k: pytest.fail("the evaluation ran"))
    (tmp_path / "FILE").write_text("mine")
    (tmp_path / "DIR").mkdir()
    names = {"DIR": str(tmp_path / "DIR"), "FILE": str(tmp_path / "FILE")}
    argv = [a.replace("DIR", names["DIR"]).replace("FILE", names["FILE"]) for a in argv]
    refused(capsys, argv, message.replace("DIR", names["DIR"]).replace("FILE", names["FILE"]), tmp_path / "cal.yaml")


@pytest.mark.parametrize("budget, message", [
    ("psnr=-5", "a PSNR bound is a positive number of dB, not -5"),
    ("psnr=nan", "a PSNR bound is a positive number of dB, not nan"),
    ("psnr=inf", "a PSNR bound is a positive number of dB, not inf"),
    ("ssim=0.9", "calibrate knows psnr=DB (mean), psnr_worst=DB and psnr_p5=DB"),
    ("psnr=thirty", "'thirty' is not a number of dB"),
])
def test_calibrate_budgets_that_mean_nothing_are_refused(tmp_path, capsys, budget, message):
    out = tmp_path / "cal.yaml"
    refused(capsys, ["calibrate", "r.yaml", "--budget", budget, "-o", str(out)], message, out)


@pytest.mark.parametrize("grid, message", [("x,0.1", "expected comma-separated numbers"), ("0.1,nan", "candidate values must be finite")])
def test_calibrate_grids_that_are_not_numbers_are_refused(tmp_path, capsys, grid, message):
    out = tmp_path / "cal.yaml"
    refused(capsys, ["calibrate", "r.yaml", "--grid", grid, "-o", str(out)], f"--grid '{grid}': {message}", out)


def test_no_force_names_a_flag_that_exists(reference_recipe, reference_bundle, capsys):
    from vdopt.cli import build_parser

    before = (reference_bundle / "manifest.json").read_bytes()
    refused(capsys, ["compile", str(reference_recipe), str(TEACHER), "-o", str(reference_bundle), "--no-force"],
            "a bundle already exists there; pass --force to replace it", reference_bundle / "nothing")
    assert build_parser().parse_args(["compile", "r.yaml", "-o", "x", "--force"]).force
    assert (reference_bundle / "manifest.json").read_bytes() == before
