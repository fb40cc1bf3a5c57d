"""The C++ runtime (cuda/runtime): built with CMake from the source tree, run on AOTInductor bundles against the
Python Session, refusing what Python refuses, and clean under AddressSanitizer and UBSan."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cmd_helpers import random_cmd_file
from vdopt.bundle import MANIFEST, MANIFEST_CHECKSUM
from vdopt.compiler import compile_bundle
from vdopt.recipe import load_recipe, parse_recipe
from vdopt.runtime import Session

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"
PROMPTS = ["red circle moving up-left", "blue square moving right"]
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="CMake is not installed on this machine")


def build(directory: Path, *options: str) -> Path:
    """Configures and builds the runtime; warnings are errors (-Wall -Wextra -Werror)."""
    prefix = __import__("torch.utils", fromlist=["cmake_prefix_path"]).cmake_prefix_path
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    for command in (["cmake", "-S", str(ROOT / "cuda" / "runtime"), "-B", str(directory), *generator,
                     f"-DCMAKE_PREFIX_PATH={prefix}", *options], ["cmake", "--build", str(directory)]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return directory / "vdopt-run"


@pytest.fixture(scope="module")
def vdopt_run(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("runtime"))


def reference_recipe(name: str, steps: int | None = None, passes=None, split: str = "auto", backend: str = "aoti"):
    data = load_recipe(ROOT / "recipes" / name).model_dump(mode="json")
    if steps is not None:
        data["sampler"]["steps"] = steps
    if passes is not None:
        data["passes"] = passes
    data["lower"] = {**data["lower"], "backend": backend, "split_conditionals": split}
    data.pop("verify", None)
    return parse_recipe(data)


CACHE = {"name": "insert_cache", "params": {"policy": "first_blocks", "threshold": 0.05, "max_reuse": 2, "forecast": 0.5,
                                            "ops": "fused"}}
BUNDLES = {  # recipe makers, given a directory for the files a recipe needs
    "teacher": lambda d: reference_recipe("reference.yaml", steps=3),
    "student": lambda d: reference_recipe("student_reference.yaml"),
    "cached": lambda d: reference_recipe("reference.yaml", steps=6, passes=[CACHE], split="never"),
    "cached_split": lambda d: reference_recipe("reference.yaml", steps=6, passes=[CACHE], split="always"),
    "staged": lambda d: reference_recipe("reference.yaml", steps=3, passes=[
        {"name": "rewrite_content_motion", "params": {"weights": str(random_cmd_file(d / "cmd.safetensors"))}}]),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("bundles")
    made = {}
    for name, recipe in BUNDLES.items():
        torch.manual_seed(0)
        compile_bundle(recipe(directory), TEACHER, directory / f"{name}.vdopt", verify=False)
        made[name] = directory / f"{name}.vdopt"
    return made


def conditioning(bundle: Path, directory: Path) -> tuple[dict, dict | None, list[str]]:
    """The prompts' conditioning from the bundle's encoder, written as .safetensors for vdopt-run."""
    cond, uncond = Session(bundle).prompt_encoder()(PROMPTS)
    save_file({k: v.contiguous() for k, v in cond.items()}, str(directory / "cond.safetensors"))
    args = ["--cond", str(directory / "cond.safetensors")]
    if uncond is not None:
        save_file({k: v.contiguous() for k, v in uncond.items()}, str(directory / "uncond.safetensors"))
        args += ["--uncond", str(directory / "uncond.safetensors")]
    return cond, uncond, args


def run(vdopt_run: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(vdopt_run), *map(str, args)], capture_output=True, text=True, env=env)


@needs_cmake
@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_vdopt_run_equals_the_python_session(name, vdopt_run, bundles, tmp_path):
    bundle = bundles[name]
    cond, uncond, args = conditioning(bundle, tmp_path)
    result = run(vdopt_run, bundle, *args, "--seed", 11, "-o", tmp_path / "latent.safetensors", "--png", tmp_path / "frames")
    assert result.returncode == 0, result.stderr
    got = load_file(str(tmp_path / "latent.safetensors"))["latent"]
    expected = Session(bundle).run(cond, uncond, seed=11, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    rgb = ((got.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)  # vdopt.video.to_frames at the clip's size
    frames = rgb.permute(2, 3, 0, 4, 1).reshape(rgb.shape[2], rgb.shape[3], -1, 3).numpy()
    written = sorted((tmp_path / "frames").glob("frame_*.png"))
    assert len(written) == frames.shape[0]
    for frame, path in zip(frames, written):
        assert (np.asarray(Image.open(path)) == frame).all()
    if name == "staged":
        assert [stage["name"] for stage in json.loads((bundle / MANIFEST).read_text())["stages"]] == ["content", "motion", "decode"]
    if name.startswith("cached"):
        manifest = json.loads((bundle / MANIFEST).read_text())
        assert manifest["op_libraries"] and manifest["segments"][0]["kind"] == ("split" if name == "cached_split" else "step")


def copy(bundle: Path, directory: Path) -> Path:
    target = directory / bundle.name
    shutil.copytree(bundle, target)
    return target


def reseal(bundle: Path, edit) -> None:
    """Edits the manifest and rewrites manifest.sha256 to match (what an attacker who can write both does)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    text = json.dumps(manifest).encode()
    (bundle / MANIFEST).write_bytes(text)
    (bundle / MANIFEST_CHECKSUM).write_text(f"{hashlib.sha256(text).hexdigest()}  {MANIFEST}\n")


def outside(manifest):
    manifest["segments"][0]["files"] = ["../../../etc/passwd"]


def schema(manifest):
    manifest["schema_version"] = 99


def tamper(bundle: Path) -> None:
    package = next((bundle / "segments").glob("*.pt2"))
    with open(package, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff")


def drop_library(bundle: Path) -> None:
    (bundle / "ops" / "vdopt_ops.so").unlink()


CASES = {  # case -> (bundle, how to break it, what the message says)
    "tampered file": ("teacher", tamper, r"does not match its checksum in the manifest"),
    "path outside the bundle": ("teacher", lambda b: reseal(b, outside), r"points outside the bundle"),
    "wrong schema version": ("teacher", lambda b: reseal(b, schema), r"manifest schema 99, this runtime reads 2"),
    "missing custom-op library": ("cached", drop_library, r"ops/vdopt_ops.so: listed in the manifest but missing"),
    "unlisted file": ("teacher", lambda b: (b / "segments" / "extra.so").write_bytes(b"\x7fELF"), r"'segments/extra.so' is in the "
                                                                                                 r"bundle but not in its manifest"),
    "stage fed from nowhere": ("staged", lambda b: reseal(b, lambda m: m["stages"][1]["feeds"].update({"cond.content": "nowhere"})),
                               r"stages\[1\]\.feeds\.cond\.content names no earlier stage's output"),
    "TensorRT segment": ("teacher", lambda b: reseal(b, lambda m: m["segments"][0].update(backend="tensorrt")),
                         r"is a TensorRT engine, (and this runtime was built without TensorRT|which runs on a CUDA device: pass "
                         r"--device cuda)"),
    "ONNX segment": ("teacher", lambda b: reseal(b, lambda m: m["segments"][0].update(backend="onnx")),
                     r"segment step_0 is a onnx segment; the C\+\+ runtime runs AOTInductor and TensorRT segments"),
    "stage noise offset edited": ("staged", lambda b: reseal(b, lambda m: m["stages"][1].update(noise_offset="x")),
                                  r"stages\[1\]\.noise_offset has the wrong type"),
}


@needs_cmake
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_bundle_is_a_clear_error_and_exit_status_2(case, vdopt_run, bundles, tmp_path):
    name, breaking, message = CASES[case]
    bundle = copy(bundles[name], tmp_path)
    _, _, args = conditioning(bundles[name], tmp_path)
    breaking(bundle)
    result = run(vdopt_run, bundle, *args, "-o", tmp_path / "latent.safetensors")
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith("vdopt-run: error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert __import__("re").search(message, result.stderr), result.stderr
    assert not (tmp_path / "latent.safetensors").exists()


@needs_cmake
def test_a_wrong_conditioning_shape_is_a_clear_error(vdopt_run, bundles, tmp_path):
    save_file({"encoder_hidden_states": torch.zeros(2, 5, 7)}, str(tmp_path / "cond.safetensors"))
    result = run(vdopt_run, bundles["teacher"], "--cond", tmp_path / "cond.safetensors", "-o", tmp_path / "out.safetensors")
    assert result.returncode == 2 and "conditioning input 'cond.encoder_hidden_states' has shape [2, 5, 7]" in result.stderr


@needs_cmake
def test_bad_arguments_say_how_to_call_it(vdopt_run, tmp_path):
    result = run(vdopt_run, "--frobnicate")
    assert result.returncode == 2 and "unknown option --frobnicate" in result.stderr and "usage: vdopt-run" in result.stderr


@needs_cmake
def test_under_address_and_undefined_behaviour_sanitizers(bundles, tmp_path_factory, tmp_path):
    """The runtime built with -fsanitize=address,undefined runs a split cached bundle (custom-op library, the
    conditional's parts) and a staged one (three stages, values fed between them) to the same latents. Leak checking
    is off: torch's own allocations live until exit."""
    sanitized = build(tmp_path_factory.mktemp("sanitized"), "-DVDOPT_SANITIZE=ON")
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    for name in ("cached_split", "staged"):
        bundle = bundles[name]
        cond, uncond, args = conditioning(bundle, tmp_path)
        result = run(sanitized, bundle, *args, "--seed", 3, "-o", tmp_path / f"{name}.safetensors", env=env)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "runtime error" not in result.stderr and "AddressSanitizer" not in result.stderr
        got = load_file(str(tmp_path / f"{name}.safetensors"))["latent"]
        torch.testing.assert_close(got, Session(bundle).run(cond, uncond, seed=3, progress=False), atol=1e-6, rtol=0)


@needs_cmake
def test_the_example_app_builds_against_the_runtime_and_runs(bundles, tmp_path_factory, tmp_path):
    """cuda/examples: an app linking libvdopt_runtime, as the README says to build it; its latent is the Session's
    (unconditional inputs from the manifest's null rules)."""
    import torch.utils

    build_dir = tmp_path_factory.mktemp("example")
    for command in (["cmake", "-S", str(ROOT / "cuda" / "examples"), "-B", str(build_dir),
                     *(["-G", "Ninja"] if shutil.which("ninja") else []), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                    ["cmake", "--build", str(build_dir)]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    bundle = bundles["teacher"]
    cond, _, _ = conditioning(bundle, tmp_path)
    result = subprocess.run([str(build_dir / "embed"), str(bundle), str(tmp_path / "cond.safetensors"), "5"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "reference bundle, 3 steps, guided" in result.stdout, result.stderr
    got = load_file(str(tmp_path / "latent.safetensors"))["latent"]
    torch.testing.assert_close(got, Session(bundle).run(cond, seed=5, progress=False), atol=1e-6, rtol=0)


@needs_cmake
def test_prompts_go_through_the_bundles_encoder_package(vdopt_run, bundles, tmp_path):
    """From prompt to clip in C++: the reference family's encoder is an AOTInductor package in the bundle, and the
    prompt is parsed by the manifest's vocabulary (any case and spacing, as Python's parser)."""
    bundle = bundles["teacher"]
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["prompt_encoder"]["file"] == "extras/prompt_encoder.aoti.pt2"
    prompts = ["red circle moving up-left", "Blue  Square moving RIGHT"]
    args = [arg for prompt in prompts for arg in ("--prompt", prompt)]
    result = run(vdopt_run, bundle, *args, "--seed", 2, "-o", tmp_path / "latent.safetensors")
    assert result.returncode == 0, result.stderr
    session = Session(bundle)
    expected = session.run(*session.prompt_encoder()(prompts), seed=2, progress=False)
    torch.testing.assert_close(load_file(str(tmp_path / "latent.safetensors"))["latent"], expected, atol=1e-6, rtol=0)
    result = run(vdopt_run, bundle, "--prompt", "purple circle moving up", "-o", tmp_path / "other.safetensors")
    assert result.returncode == 2 and "unknown colour 'purple'; expected one of red, green, blue, yellow" in result.stderr


@needs_cmake
@pytest.mark.tensorrt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_tensorrt_bundles_run_as_in_the_python_session(tmp_path_factory, tmp_path):
    """Where TensorRT's C++ headers and libnvinfer are found (TensorRT_ROOT): the runtime built with them runs the
    teacher's engine and a split cached bundle's engines (aten cache ops: no plugins) on CUDA to the Python Session's
    latents, and refuses an engine that calls a vdopt plugin it has no creator for, by name."""
    from test_tensorrt import HAS_TENSORRT

    if not HAS_TENSORRT:
        pytest.skip("TensorRT libraries are not loadable on this machine (no GPU build)")
    directory = tmp_path_factory.mktemp("runtime_tensorrt")
    root = [f"-DTensorRT_ROOT={os.environ['TensorRT_ROOT']}"] if "TensorRT_ROOT" in os.environ else []
    runtime = build(directory, *root)
    if "TENSORRT_INCLUDE_DIR:PATH=/" not in (directory / "CMakeCache.txt").read_text():
        pytest.skip("CMake found no TensorRT C++ headers (NvInferRuntime.h); set TensorRT_ROOT to a TensorRT install")
    aten_cache = {"name": "insert_cache", "params": {**CACHE["params"], "ops": "aten"}}
    recipes = {"teacher": reference_recipe("reference.yaml", steps=3, backend="tensorrt"),
               "cached_split": reference_recipe("reference.yaml", steps=6, passes=[aten_cache], backend="tensorrt")}
    for name, recipe in recipes.items():
        bundle = tmp_path / f"{name}.vdopt"
        compile_bundle(recipe, TEACHER, bundle, verify=False)
        cond, uncond = Session(bundle, device="cuda").prompt_encoder()(PROMPTS)
        save_file({k: v.contiguous().cpu() for k, v in cond.items()}, str(tmp_path / "cond.safetensors"))
        save_file({k: v.contiguous().cpu() for k, v in uncond.items()}, str(tmp_path / "uncond.safetensors"))
        result = run(runtime, bundle, "--cond", tmp_path / "cond.safetensors", "--uncond", tmp_path / "uncond.safetensors",
                     "--device", "cuda", "--seed", 3, "-o", tmp_path / f"{name}.safetensors")
        assert result.returncode == 0, result.stderr[-4000:]
        expected = Session(bundle, device="cuda").run(cond, uncond, seed=3, progress=False).cpu()
        torch.testing.assert_close(load_file(str(tmp_path / f"{name}.safetensors"))["latent"], expected, atol=1e-5, rtol=0)
    fused = tmp_path / "fused.vdopt"
    compile_bundle(reference_recipe("reference.yaml", steps=3, passes=[CACHE], backend="tensorrt"), TEACHER, fused, verify=False)
    result = run(runtime, fused, "--cond", tmp_path / "cond.safetensors", "--uncond", tmp_path / "uncond.safetensors",
                 "--device", "cuda", "-o", tmp_path / "fused.safetensors")
    assert result.returncode == 2 and "vdopt::cache_decision, a TensorRT plugin with no creator registered" in result.stderr
