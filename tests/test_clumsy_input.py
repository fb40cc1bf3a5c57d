"""Clumsy and hostile input that is not code execution (issue 15): each gets a one-paragraph message
and exit status 2, never a traceback, a hang, or a silently wrong result."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from vdopt.cli import main
from vdopt.errors import RecipeError
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


@pytest.fixture(scope="module")
def reference_bundle(tmp_path_factory) -> Path:
    data = load_recipe(ROOT / "recipes" / "reference.yaml").model_dump(mode="json")
    data["sampler"]["steps"] = 1
    data["lower"] = {"backend": "torch"}
    directory = tmp_path_factory.mktemp("reference")
    recipe = directory / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["compile", str(recipe), str(ROOT / "vdopt/reference/weights/teacher.safetensors"), "-o", str(directory / "b.vdopt")]) == 0
    return directory / "b.vdopt"


@pytest.mark.parametrize("prompt", ["a dog running on the beach 🐶", "   ", "red circle moving sideways", "RED CIRCLE"])
def test_prompts_the_reference_model_does_not_know_list_its_vocabulary(reference_bundle, tmp_path, capsys, prompt):
    out = tmp_path / "clip.gif"
    assert main(["run", str(reference_bundle), "--prompt", prompt, "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "colour in" in err and "'circle'" in err and "'up-left'" in err, err
    assert not out.exists()


@pytest.mark.parametrize("device, message", [("tpu", "cpu or cuda"), ("potato", "not one torch knows"),
                                             pytest.param("cuda", "no CUDA GPU", marks=pytest.mark.skipif(
                                                 __import__("torch").cuda.is_available(), reason="this machine has a GPU"))])
def test_devices_vdopt_cannot_run_on_are_refused_before_loading(reference_bundle, tmp_path, capsys, device, message):
    out = tmp_path / "clip.gif"
    assert main(["run", str(reference_bundle), "--prompt", "red circle moving up", "--device", device, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_eval_of_no_prompts_is_refused(capsys):
    assert main(["eval", "--prompts", "0"]) == 2
    assert "at least one clip" in capsys.readouterr().err
