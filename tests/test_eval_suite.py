import argparse
import json

import pytest
import torch

from vdopt.data.moving_shapes import HELD_OUT_COMBOS, make_clip, parse_prompt
from vdopt.eval import suite
from vdopt.eval.classifier import WEIGHTS_DIR, WEIGHTS_FILE, ShapeClassifier
from vdopt.reference.model import WEIGHTS_DIR as TEACHER_DIR

needs_classifier = pytest.mark.skipif(not (WEIGHTS_DIR / WEIGHTS_FILE).exists(), reason="classifier weights not shipped")


def real_fn(prompts, seeds):
    """A 'generator' that returns real clips: the best a model could do."""
    return torch.stack([make_clip(parse_prompt(p), s).video for p, s in zip(prompts, seeds)])


def test_prompt_set_is_deterministic_and_split():
    p, s, h = suite.prompt_set(16, seed=3)
    assert (p, s, h) == suite.prompt_set(16, seed=3)
    assert len(p) == len(s) == len(h) == 16 and sum(h) == 4
    assert all((parse_prompt(x) in set(HELD_OUT_COMBOS)) == flag for x, flag in zip(p, h))
    assert len(set(s)) == 16
    assert suite.prompt_set(16, seed=4)[1] != s


def test_classifier_shapes():
    m = ShapeClassifier().eval()
    pred, feats = m.predict(torch.zeros(3, 3, 8, 32, 32))
    assert pred.shape == (3, 3) and feats.shape == (3, 128)


@needs_classifier
def test_real_generator_scores_like_real_data(tmp_path):
    r = suite.evaluate(real_fn, 24, seed=1, reference_fn=real_fn, json_path=tmp_path / "m.json",
                       sheet_path=tmp_path / "s.png", sheet_clips=3)
    for split in ("seen", "held_out", "all"):
        a = r[split]["accuracy"]
        assert min(a["shape"], a["colour"], a["direction"]) >= 0.8, (split, a)
        v = r[split]["vs_reference"]
        assert v["identical_clips"] == r[split]["n"] and v["ssim"] == pytest.approx(1.0)
        assert v["fvd_ms"] == pytest.approx(0.0, abs=1e-6)
    assert r["all"]["temporal"]["fully_tracked"] == 1.0
    assert r["held_out"]["n"] == 6 and r["seen"]["n"] == 18
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["all"]["accuracy"] == r["all"]["accuracy"]
    from PIL import Image

    im = Image.open(tmp_path / "s.png")
    assert im.size[0] > 8 * 32 * 3 and im.size[1] > 3 * 2 * 32 * 3


@needs_classifier
def test_a_bad_generator_scores_worse():
    def blurred_noisy(prompts, seeds):
        v = real_fn(prompts, seeds)
        g = torch.Generator().manual_seed(0)
        return (v.roll(shifts=1, dims=2) * 0.3 + 0.7 * torch.randn(v.shape, generator=g)).clamp(-1, 1)

    good = suite.evaluate(real_fn, 16, seed=2, reference_fn=real_fn)
    bad = suite.evaluate(blurred_noisy, 16, seed=2, reference_fn=real_fn)
    assert bad["all"]["fvd_ms"] > 2 * good["all"]["fvd_ms"] + 1
    assert bad["all"]["vs_reference"]["psnr_db"] < 10
    assert bad["all"]["accuracy"]["all"] < good["all"]["accuracy"]["all"]
    assert bad["all"]["temporal"]["score"] < good["all"]["temporal"]["score"]


def test_cli_registers_eval_subcommand():
    from vdopt.eval import cli

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    cli.register(sub)
    a = ap.parse_args(["eval", "--prompts", "8", "--quick", "--naive-steps", "4", "--json", "x.json", "--sheet", "x.png"])
    assert a.func is cli.run and a.bundle is None and a.naive_steps == 4 and a.prompts == 8
    a = ap.parse_args(["eval", "some.vdopt", "--against", "teacher", "--guidance", "2"])
    assert a.bundle == "some.vdopt" and a.against == "teacher" and a.guidance == 2.0


def test_generate_from_bundle_missing_bundle_names_it(tmp_path):
    from vdopt.eval.cli import generate_from_bundle

    with pytest.raises(Exception, match="nope"):
        generate_from_bundle(tmp_path / "nope.vdopt")


def test_cache_reuses_generated_clips(tmp_path):
    from vdopt.eval.cli import cached

    calls = []

    def fn(prompts, seeds):
        calls.append(list(seeds))
        return real_fn(prompts, seeds)

    f = cached(fn, "real", tmp_path)
    a = f(["red circle moving up"], [3])
    b = f(["red circle moving up"], [3])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert calls == [[3]]
    f(["red circle moving up"], [4])
    assert calls == [[3], [4]]


@needs_classifier
@pytest.mark.skipif(not (TEACHER_DIR / "teacher.safetensors").exists(), reason="teacher weights not shipped")
def test_cli_eval_teacher_end_to_end(tmp_path, capsys):
    from vdopt.eval import cli

    out = tmp_path / "m.json"
    assert cli.main(["eval", "--prompts", "4", "--steps", "3", "--naive-steps", "1", "--threads", "1",
                     "--json", str(out), "--sheet", str(tmp_path / "s.png"), "--cache", str(tmp_path / "c")]) == 0
    r = json.loads(out.read_text())
    assert r["label"].startswith("teacher@1steps") and r["prompts_n"] == 4
    v = r["all"]["vs_reference"]
    assert 0 < v["psnr_db"] < 100 and -1 <= v["ssim"] < 1  # 1-step differs from 3-step
    assert "FVD-MS" in capsys.readouterr().out
    assert len(list((tmp_path / "c").iterdir())) == 2  # one batch per generator


def test_cached_teacher_clips_are_keyed_by_the_weights(tmp_path, monkeypatch):
    """A retrained teacher must not reuse the clips its predecessor left in --cache."""
    from vdopt.eval.cli import generator_for
    from vdopt.reference import model as RM

    tiny = dict(RM.TEACHER_CONFIG, num_layers=1, num_attention_heads=1, attention_head_dim=16, cross_attention_dim=16,
                caption_channels=8)
    labels = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        RM.save_reference(RM.build_teacher(tiny), RM.PromptConditioner(dim=8), tmp_path / str(seed))
        monkeypatch.setattr(RM, "WEIGHTS_DIR", tmp_path / str(seed))
        _, label, cache_label = generator_for("teacher", 50, None, "cpu")
        labels.append((label, cache_label))
    assert labels[0][0] == labels[1][0] and labels[0][1] != labels[1][1]
