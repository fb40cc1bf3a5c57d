"""Contract 8: `vdopt compile --verify` measures the bundle against the unoptimised program and refuses
to write one that misses the recipe's budget. Measured on the shipped teacher (quality claims need
real weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vdopt.cli import main
from vdopt.compiler import compile_bundle
from vdopt.measure import Budget, PsnrStats
from vdopt.recipe import load_recipe, parse_recipe
from vdopt.verify import VerifyError

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "vdopt" / "reference" / "weights" / "teacher.safetensors"


def teacher_recipe(tmp_path: Path, passes: list, verify: dict, steps: int = 10) -> Path:
    data = load_recipe(ROOT / "recipes" / "reference.yaml").model_dump(mode="json", exclude={"verify"})
    data["sampler"]["steps"] = steps
    data.update(passes=passes, lower={"backend": "torch"}, verify=verify)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


SKIP_MOST = [{"name": "insert_cache", "params": {"policy": "teacache", "first": 0, "threshold": 5.0, "max_reuse": 10}}]


def test_too_aggressive_cache_is_refused_with_the_numbers(tmp_path, capsys):
    recipe = teacher_recipe(tmp_path, SKIP_MOST, {"psnr_mean": 30, "prompts": 2})
    out = tmp_path / "out.vdopt"
    assert main(["compile", str(recipe), str(TEACHER), "-o", str(out)]) != 0
    message = capsys.readouterr().err
    assert "misses its quality budget" in message and "mean PSNR" in message and "worst clip" in message, message
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"], "a refused compile left files behind"


def test_no_verify_writes_the_bundle_anyway(tmp_path):
    recipe = teacher_recipe(tmp_path, SKIP_MOST, {"psnr_mean": 30, "prompts": 1})
    assert main(["compile", str(recipe), str(TEACHER), "-o", str(tmp_path / "out.vdopt"), "--no-verify"]) == 0
    assert "verify" not in json.loads((tmp_path / "out.vdopt" / "manifest.json").read_text())


def test_the_calibrated_shipped_recipe_is_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = load_recipe(ROOT / "recipes" / "reference_cached.yaml").model_dump(mode="json")
    data["lower"]["backend"] = "torch"  # the differential tests hold every backend to the torch bundle
    manifest = compile_bundle(parse_recipe(data), TEACHER, tmp_path / "cached.vdopt")
    report = manifest["verify"]
    assert report["passed"] and report["budget"] == load_recipe(ROOT / "recipes" / "reference_cached.yaml").verify.budget().to_json()
    assert report["psnr_mean"] >= report["budget"]["psnr_mean"] and report["psnr_worst"] <= report["psnr_p5"] <= report["psnr_mean"]
    assert report["prompts"] == data["verify"]["prompts"]
    assert set(report["accuracy"]) == {"unoptimised", "bundle"}
    on_disk = json.loads((tmp_path / "cached.vdopt" / "manifest.json").read_text())
    assert on_disk["verify"] == report


def test_verify_without_a_budget_measures_and_records(tmp_path):
    recipe = teacher_recipe(tmp_path, SKIP_MOST, {"prompts": 1})
    manifest = compile_bundle(recipe, TEACHER, tmp_path / "out.vdopt", verify=True)
    assert manifest["verify"]["passed"] and manifest["verify"]["budget"] == {}
    assert 5 < manifest["verify"]["psnr_mean"] < 40  # skipping most of the body is measurably lossy


def test_the_unoptimised_program_is_the_capture_before_the_passes(tmp_path, monkeypatch):
    """The student recipe against the same sampler without reduce_steps (the teacher's weights): a pass
    that wrote the student's weights into the capture would make the two identical (100 dB)."""
    monkeypatch.chdir(ROOT)
    data = load_recipe(ROOT / "recipes" / "student_reference.yaml").model_dump(mode="json")
    data.update(lower={"backend": "torch"}, verify={"prompts": 1})
    manifest = compile_bundle(parse_recipe(data), TEACHER, tmp_path / "student.vdopt", verify=True)
    assert manifest["verify"]["psnr_mean"] < 40


def test_accuracy_budget_needs_a_family_the_classifier_knows(tmp_path):
    recipe = parse_recipe({"model": {"family": "wan", "input": {"frames": 2, "height": 4, "width": 4, "text_len": 3}},
                           "sampler": {"steps": 2}, "verify": {"accuracy_drop": 2}})
    with pytest.raises(VerifyError, match="reference family only"):
        compile_bundle(recipe, None, tmp_path / "w.vdopt")
    assert not (tmp_path / "w.vdopt").exists()


def test_budget_reports_every_bound_it_misses():
    stats = PsnrStats(mean=31.0, worst=22.0, p5=24.0)
    assert Budget(psnr_mean=30).misses(stats) == []
    assert Budget(psnr_mean=30, psnr_worst=25).misses(stats) == ["worst-clip PSNR 22.00 dB < 25 dB"]
    assert Budget(psnr_p5=25, accuracy_drop=2).misses(stats, accuracy_drop=3.0) == [
        "5th-percentile PSNR 24.00 dB < 25 dB", "attribute accuracy drops 3.0 points > 2"]
    assert not Budget() and Budget(psnr_worst=1)


def test_old_budget_key_is_a_clear_error():
    from vdopt.errors import RecipeError

    with pytest.raises(RecipeError, match="psnr_min was renamed"):
        parse_recipe({"model": {"family": "wan", "input": {"frames": 2, "height": 4, "width": 4}}, "verify": {"psnr_min": 30}})
