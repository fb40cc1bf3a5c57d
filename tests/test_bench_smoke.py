"""The benchmark scripts run end to end on a small setting (slow tier). A bench that dies after an hour
of evaluation (bench/cache.py did, on a batch-dynamic trace) costs the hour; this costs minutes.
Nothing here looks at the timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def bench(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, check=True, timeout=1800)


def test_cache_bench(tmp_path):
    out = tmp_path / "cache.json"
    bench("cache.py", "--quick", "--policies", "static:max_reuse=-1,first=0", "--eval-prompts", "2", "--json", str(out),
          "--trace-png", str(tmp_path / "trace.png"), "--recipe-out", str(tmp_path / "best.yaml"))
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"uncached", "static:max_reuse=-1,first=0", "floor"}
    assert 0 < rows["static:max_reuse=-1,first=0"]["body_evals_saved"] < 1 and "psnr_db_worst" in rows["floor"]


def test_backends_bench(tmp_path):
    out = tmp_path / "backends.json"
    bench("backends.py", "--configs", "student", "--backends", "torch", "--rounds", "1", "--warmup", "0", "--json", str(out))
    rows = json.loads(out.read_text())["configs"][0]["rows"]
    assert [r["backend"] for r in rows] == ["eager", "torch"] and rows[1]["max_abs_diff_vs_eager"] < 1e-4


def test_skip_path_bench(tmp_path):
    out = tmp_path / "skip.json"
    bench("skip_path.py", "--backend", "torch", "--repeats", "1", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["reuse_steps"] > 0 and result["skip_step_ms"][0] > 0


def test_cache_hooks_bench(tmp_path):
    out = tmp_path / "hooks.json"
    bench("cache_hooks.py", "--eval-prompts", "2", "--calibration-prompts", "1", "--rounds", "1", "--knob-values", "",
          "--hooks", "diffusers FirstBlockCache,diffusers PAB", "--json", str(out))
    result = json.loads(out.read_text())
    shipped = [n for n in result["rows"] if n.startswith("vdopt ") and n.endswith("(shipped)")]
    assert {"uncached bundle", "eager diffusers loop"} <= set(result["rows"]) and len(shipped) == 2  # torch and aoti
    assert len(result["hook_sweeps"]["diffusers FirstBlockCache"]) == 9 and result["rows"][shipped[0]]["work"]["body_evals_saved"] > 0
    assert set(result["comparison"]) == {"diffusers FirstBlockCache", "diffusers PAB"}


def test_steps_bench(tmp_path):
    out = tmp_path / "steps.json"
    bench("steps.py", "--configs", "onnx:1", "--rounds", "1", "--warmup", "0", "--json", str(out))
    config = json.loads(out.read_text())["configs"][0]
    assert (config["backend"], config["batch"], set(config["rows"])) == ("onnx", 1, {"teacher", "student"})


def test_prune_bench(tmp_path):
    out = tmp_path / "prune.json"
    bench("prune.py", "--backend", "torch", "--prompts", "4", "--rounds", "1", "--cache", str(tmp_path / "cache"),
          "--json", str(out))
    record = json.loads(out.read_text())
    assert set(record["rows"]) == {"student", "pruned, no recovery", "pruned + recovery (shipped)"}
    student, pruned = record["rows"]["student"], record["rows"]["pruned + recovery (shipped)"]
    assert student["parameters"] > pruned["parameters"] and student["mflops_per_step"] > pruned["mflops_per_step"]
    assert record["flops_ratio"] == pytest.approx(student["mflops_per_step"] / pruned["mflops_per_step"], abs=1e-3)


def test_e2e_bench(tmp_path):
    out = tmp_path / "e2e.json"
    bench("e2e.py", "--backends", "torch", "--prompts", "4", "--rounds", "1", "--cache", str(tmp_path / "cache"),
          "--json", str(out))
    record = json.loads(out.read_text())
    assert set(record["rows"]) == {"eager teacher, 50 steps, g=3", "student_reference on torch",
                                   "pruned_student_reference on torch"}


def test_cmd_bench(tmp_path):
    out = tmp_path / "cmd.json"
    bench("cmd.py", "--backend", "torch", "--prompts", "4", "--rounds", "1", "--cache", str(tmp_path / "cache"),
          "--json", str(out), "--sheet", str(tmp_path / "sheet.png"))
    record = json.loads(out.read_text())
    assert set(record["rows"]) == {"teacher", "cmd"} and set(record["flops_per_clip"]) == {"8", "16", "32"}
    assert record["autoencoder"]["clips"] == 4 and (tmp_path / "sheet.png").is_file()
    assert record["autoencoder_on_teacher_clips"]["clips"] == 4
    assert set(record["cmd_stage_ms_per_clip"]) == {"content", "motion", "decode"}
    assert record["batches"] == [1, 4] and set(record["speedup_by_batch"]) == set(record["rows"]["cmd"]["by_batch"]) == {"1", "4"}
    assert len(record["rows"]["teacher"]["by_batch"]["4"]["seconds_per_clip"]) == 1


def test_kernel_profile_bench(tmp_path):
    out = tmp_path / "kernel_profile.json"
    bench("kernel_profile.py", "--recipes", "recipes/reference.yaml", "--rounds", "1", "--json", str(out))
    row = json.loads(out.read_text())["rows"]["reference"]
    assert len(row["seconds_per_clip_off"]) == len(row["seconds_per_clip_on"]) == 1 and row["slowdown_median"] > 0


def test_aoti_rewrites_bench(tmp_path):
    out = tmp_path / "rewrite.json"
    bench("aoti_rewrites.py", "--recipes", "recipes/cmd_reference.yaml", "--rounds", "1", "--json", str(out))
    row = json.loads(out.read_text())["rows"]["recipes/cmd_reference.yaml"]
    assert set(row["bundles"]) == {"with", "without"} and row["speedup_median"] > 0
    assert set(row["bundles"]["with"]["stage_ms_median"]) == {"content", "motion", "decode"} and row["largest_clip_difference"] < 1e-3


def test_onednn_convolution_bench(tmp_path):
    out = tmp_path / "onednn.json"
    bench("onednn_convolution.py", "--rounds", "1", "--calls", "2", "--json", str(out))
    record = json.loads(out.read_text())
    assert len(record["eager_convolutions"]) == 8 and record["largest_clip_difference"] < 1e-3
    assert {set(row["stage_ms_median"]) for row in record["bundles"].values()} == {frozenset({"content", "motion", "decode"})}
