"""calibrate: the search's budget logic on synthetic curves, and one end-to-end run on a tiny random Wan."""

from __future__ import annotations

import pytest
import torch
import yaml

from vdopt.calibrate import KNOBS, CalibrationError, Knob, calibrate, knob_for, main, parse_budget, savings, search
from vdopt.compiler import compile_bundle
from vdopt.measure import Budget, PsnrStats, make_inputs, render
from vdopt.recipe import load_recipe
from vdopt.runtime import Session

THRESHOLD = KNOBS["first_blocks"]
MEAN_30 = Budget(psnr_mean=30.0)


def curve(saved_of, psnr_of, worst_of=lambda v: None):
    seen = []

    def measure(value):
        seen.append(value)
        saved = saved_of(value)
        worst = worst_of(value)
        worst = psnr_of(value) - 1 if worst is None else worst
        return saved, saved, PsnrStats(psnr_of(value), worst, (psnr_of(value) + worst) / 2)

    return measure, seen


def test_search_takes_the_most_saving_value_within_budget():
    measure, seen = curve(lambda v: min(v, 0.6), lambda v: 60 - 100 * v)  # passes up to v = 0.3
    best, trials = search(THRESHOLD, THRESHOLD.grid, measure, budget=MEAN_30, refine=3)
    grid = [t.value for t in trials if t.phase == "grid"]
    assert grid == sorted(grid) and grid[-1] == 0.45, "conservative to aggressive, stopping at the first miss"
    assert not trials[len(grid) - 1].ok and all(t.ok for t in trials[: len(grid) - 1])
    bisect = [t.value for t in trials if t.phase == "bisect"]
    assert len(bisect) == 3 and all(0.3 < v < 0.45 for v in bisect)
    assert best.ok and best.value == pytest.approx(0.3)
    assert all(t.saved <= best.saved for t in trials if t.ok)
    assert all(not t.ok for t in trials if t.saved > best.saved)


def test_search_keeps_the_best_passing_value_when_psnr_is_not_monotonic():
    psnr = {0.1: 40.0, 0.2: 31.0, 0.3: 35.0, 0.4: 20.0}
    measure, _ = curve(lambda v: v, lambda v: psnr.get(round(v, 6), 25.0))
    best, trials = search(Knob("threshold", (0.1, 0.2, 0.3, 0.4)), (0.4, 0.3, 0.2, 0.1), measure, budget=MEAN_30, refine=0)
    assert [t.value for t in trials] == [0.1, 0.2, 0.3, 0.4] and best.value == 0.3


def test_search_all_passing_takes_the_most_aggressive():
    measure, seen = curve(lambda v: v / 2, lambda v: 50.0)
    best, _ = search(THRESHOLD, THRESHOLD.grid, measure, budget=MEAN_30)
    assert seen == list(THRESHOLD.grid) and best.value == THRESHOLD.grid[-1]


def test_unreachable_budget_is_an_error_naming_the_most_conservative_setting():
    measure, seen = curve(lambda v: 0.0 if v < 0.02 else 0.5, lambda v: 100.0 if v < 0.02 else 22.0)
    with pytest.raises(CalibrationError, match=r"unreachable.*threshold=0\.02, gives mean PSNR 22\.00 dB \(worst clip 21\.00 dB"):
        search(THRESHOLD, THRESHOLD.grid, measure, budget=MEAN_30, policy="first_blocks")
    assert seen == [0.005, 0.01, 0.02]


def test_search_holds_the_worst_clip_to_its_bound():
    """The mean passes everywhere; the worst clip fails from 0.2 on: a budget on it stops the search there."""
    measure, _ = curve(lambda v: v, lambda v: 40.0, worst_of=lambda v: 30.0 if v < 0.2 else 20.0)
    best, _ = search(THRESHOLD, THRESHOLD.grid, measure, budget=Budget(psnr_mean=30, psnr_worst=25), refine=0)
    assert best.value == 0.15
    best_mean_only, _ = search(THRESHOLD, THRESHOLD.grid, measure, budget=MEAN_30, refine=0)
    assert best_mean_only.value == THRESHOLD.grid[-1]


def test_direction_and_integer_knobs():
    down = Knob("margin", (0.4, 0.2, 0.1), aggressive=-1)  # smaller = more skipping
    measure, seen = curve(lambda v: 1 - v, lambda v: 100 * v)
    best, _ = search(down, down.grid, measure, budget=Budget(psnr_mean=15.0), refine=0)
    assert seen == [0.4, 0.2, 0.1] and best.value == 0.2
    interval = KNOBS["static"]
    assert interval.integer and interval.midpoint(3, 6) == 4 and interval.midpoint(3, 4) is None


def test_knob_table_and_arguments():
    assert knob_for("first_blocks").param == "threshold" and knob_for("static").param == "interval"
    assert knob_for("teacache").param == "threshold" and knob_for("adacache").param == "codebook_scale"
    assert knob_for("future", "rho").param == "rho"
    with pytest.raises(CalibrationError, match="--search"):
        knob_for("future")
    assert parse_budget("psnr=31.5") == Budget(psnr_mean=31.5)
    assert parse_budget("psnr=30,psnr_worst=25") == Budget(psnr_mean=30, psnr_worst=25)
    with pytest.raises(CalibrationError, match="psnr=DB"):
        parse_budget("ssim=0.9")
    with pytest.raises(CalibrationError, match="positive"):
        parse_budget("psnr=-5")
    assert main(["r.yaml", "--budget", "lpips=0.1", "-o", "x.yaml"]) == 2


TINY_WAN = {"model": {"family": "wan", "input": {"frames": 3, "height": 8, "width": 8, "text_len": 7}},
            "sampler": {"steps": 6}, "lower": {"backend": "torch"}}


def test_calibrate_tiny_wan_writes_a_recipe_that_compiles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "wan.yaml"
    source.write_text(yaml.safe_dump(TINY_WAN))
    torch.manual_seed(0)  # random weights, drawn at capture
    result = calibrate(source, None, budget=40.0, prompts=1, grid=[0.1], refine=0, out=tmp_path / "cal.yaml",
                       params={"max_reuse": 3}, progress=False, log=lambda m: None)
    # on these weights 0.1 saves a third of the body evaluations at ~50 dB (the search logic is tested above)
    assert [t.value for t in result.trials] == [0.1] and result.best.ok
    assert result.best.value == 0.1 and 0 < result.best.saved < 1 and 40 <= result.best.psnr < 100
    assert result.params == {"policy": "first_blocks", "max_reuse": 3, "threshold": 0.1}
    assert "threshold" in result.table() and "<- chosen" in result.table()

    header = (tmp_path / "cal.yaml").read_text().splitlines()[0]
    assert header.startswith("# Calibrated by `vdopt calibrate` from wan.yaml:")  # relative to the working directory
    recipe = load_recipe(tmp_path / "cal.yaml")
    assert [(p.name, p.params) for p in recipe.passes] == [("insert_cache", result.params)]
    assert recipe.verify.budget() == Budget(psnr_mean=40.0) and recipe.model.family == "wan"
    assert (recipe.verify.prompts, recipe.verify.seed) == (1, 1000)  # the compile checks the calibration prompts
    torch.manual_seed(0)  # the same random weights
    manifest = compile_bundle(recipe, None, tmp_path / "cal.vdopt")
    assert manifest["verify"]["passed"] and manifest["verify"]["psnr_mean"] == pytest.approx(result.best.psnr, abs=1e-3)
    session = Session(tmp_path / "cal.vdopt")
    assert session.manifest["cache"]["threshold"] == 0.1
    inputs = make_inputs(session, 1, seed=1000)
    _, traces = render(session, inputs)
    assert savings(traces, session.num_steps)[0] == pytest.approx(result.best.saved)


def test_calibrate_json_records_the_trials_and_the_command(tmp_path, monkeypatch, capsys):
    """--json writes a results file (issue 14: every README figure has one): every trial, the choice, the
    budget, the prompts, and the command that made it, spelled out so that re-running it gives the same file."""
    import argparse
    import json
    import shlex

    from vdopt.calibrate import add_arguments

    monkeypatch.chdir(tmp_path)
    (tmp_path / "wan.yaml").write_text(yaml.safe_dump(TINY_WAN))
    torch.manual_seed(0)
    argv = ["wan.yaml", "--budget", "psnr=40", "--prompts", "1", "--param", "max_reuse=3", "--grid", "0.05,0.1",
            "--refine", "0", "-o", "cal.yaml", "--json", "out/cal.json", "--quiet"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "out" / "cal.json").read_text())
    assert record["policy"] == "first_blocks" and record["knob"] == "threshold" and record["budget"] == {"psnr_mean": 40.0}
    assert record["params"] == {"policy": "first_blocks", "max_reuse": 3, "threshold": record["chosen"]["threshold"]}
    assert len(record["prompts"]) == 1 and record["seed"] == 1000
    assert [t["threshold"] for t in record["trials"]] == [0.05, 0.1]
    assert all({"body_evals_saved", "psnr_mean", "psnr_worst", "psnr_p5", "within_budget"} <= set(t) for t in record["trials"])
    assert record["chosen"] in record["trials"]
    words = shlex.split(record["command"])
    assert words[:2] == ["vdopt", "calibrate"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert vars(parser.parse_args(words[2:])) == {**vars(parser.parse_args(argv)), "quiet": False}
    assert "wrote out/cal.json" in capsys.readouterr().out
