"""`vdopt prune`: both tables measured, the search's choice written into a recipe that compiles, budgets checked."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from vdopt.cli import main as vdopt_main
from vdopt.compiler import compile_bundle
from vdopt.families import descriptor_for
from vdopt.prune import Choice, Quality, Row, Target, search
from vdopt.measure import PsnrStats
from vdopt.runtime.session import Session


@pytest.fixture(scope="module")
def latte(tmp_path_factory):
    directory = tmp_path_factory.mktemp("prune")
    descriptor = descriptor_for("latte")
    torch.manual_seed(0)
    model = descriptor.build(dict(descriptor.tiny_config)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "latte.safetensors"))
    recipe = {"model": {"family": "latte", "input": {"frames": 4, "height": 8, "width": 8, "text_len": 7}},
              "sampler": {"kind": "flow_euler", "steps": 3, "guidance_scale": 4.0},
              "passes": [{"name": "insert_cache", "params": {"policy": "first_blocks"}}], "lower": {"backend": "torch"}}
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return directory


def test_prune_writes_both_tables_and_a_recipe_that_compiles(latte, capsys):
    out, tables = latte / "pruned.yaml", latte / "prune.json"
    assert vdopt_main(["prune", str(latte / "recipe.yaml"), str(latte / "latte.safetensors"), "--budget", "psnr=1",
                       "--contrast", "--prompts", "2", "--rounds", "1", "-o", str(out), "--json", str(tables)]) == 0
    printed = capsys.readouterr().out
    assert "denoiser.model.temporal_transformer_blocks.1" in printed and "denoiser.model.transformer_blocks.0" in printed
    record = json.loads(tables.read_text())
    assert [(row["block"].rsplit(".", 2)[-2], row["kind"]) for row in record["latency_and_sensitivity"]] == [
        ("temporal_transformer_blocks", "temporal"), ("temporal_transformer_blocks", "temporal"),
        ("transformer_blocks", "blocks"), ("transformer_blocks", "blocks")]
    assert all("cost_ms" in row and "psnr_mean" in row for row in record["latency_and_sensitivity"])
    # a 1 dB budget admits every subset of the temporal blocks: the one whose measured costs add up to the most. That is
    # both blocks unless one measured no cost in its single timed round (a busy machine), so the expectation is derived
    # from the table the run measured rather than from wall-clock luck.
    temporal = [row for row in record["latency_and_sensitivity"] if row["kind"] == "temporal"]
    subsets = [[row["block"] for row in s] for k in (1, 2) for s in itertools.combinations(temporal, k)]
    cost = {row["block"]: row["cost_ms"] for row in temporal}
    assert record["chosen"]["blocks"] == max(subsets, key=lambda s: sum(cost[b] for b in s))
    assert len(record["trials"]) == 3 and record["chosen"]["measured_ms"] > 0
    written = yaml.safe_load(out.read_text())
    assert [p["name"] for p in written["passes"]] == ["prune_temporal", "insert_cache"]
    assert written["measured"]["prune"]["chosen"] == record["chosen"]
    compile_bundle(out, latte / "latte.safetensors", latte / "pruned.vdopt")
    manifest = Session(latte / "pruned.vdopt").manifest
    assert manifest["recipe"]["measured"]["prune"]["chosen"]["blocks"] == record["chosen"]["blocks"]
    assert [p["name"] for p in manifest["passes"]][:2] == ["prune_temporal", "insert_cache"]


@pytest.mark.parametrize("budget, message", [
    ("latency=1.5", "a fraction of the unpruned step time below 1"),
    ("speed=2", "give latency=FRACTION"),
    ("latency=0.5,psnr=20", "not both"),
])
def test_a_bad_budget_is_one_line(latte, capsys, budget, message):
    code = vdopt_main(["prune", str(latte / "recipe.yaml"), "--budget", budget, "-o", str(latte / "x.yaml")])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err


def quality(psnr: float) -> Quality:
    return Quality(PsnrStats(psnr, psnr - 3, psnr - 2))


def test_search_within_a_latency_budget_keeps_the_most_quality():
    """Exhaustive over 3 candidates: of the subsets predicted within 0.7x, the one with the highest mean PSNR."""
    rows = [Row("a", "temporal", 2.0, 2.0, quality(30)), Row("b", "temporal", 2.0, 2.0, quality(25)),
            Row("c", "temporal", 1.0, 1.0, quality(35))]
    measured = {("a", "b"): 20.0, ("a", "c"): 28.0, ("b", "c"): 24.0, ("a", "b", "c"): 18.0}
    choice = search(rows, 10.0, Target(latency=0.7), lambda blocks: quality(measured[tuple(blocks)]), quality(100), lambda m: None)
    assert isinstance(choice, Choice) and choice.blocks == ["a", "c"] and choice.predicted_ms == 7.0
    assert {tuple(t["blocks"]) for t in choice.trials} == set(measured)  # {a}, {b}, {c} alone miss 0.7x


def test_search_within_a_quality_budget_saves_the_most_time():
    rows = [Row("a", "temporal", 2.0, 2.0, quality(30)), Row("b", "temporal", 3.0, 3.0, quality(25))]
    measured = {("a",): 30.0, ("b",): 25.0, ("a", "b"): 22.0}
    choice = search(rows, 10.0, Target(psnr=24), lambda blocks: quality(measured[tuple(blocks)]), quality(100), lambda m: None)
    assert choice.blocks == ["b"]
