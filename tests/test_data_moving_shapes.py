import numpy as np
import pytest
import torch

from vdopt.data import moving_shapes as ms
from vdopt.data.moving_shapes import (
    ALL_COMBOS, COLOURS, DIRECTION_VEC, DIRECTIONS, HELD_OUT_COMBOS, SEEN_COMBOS, SHAPES,
    Attrs, ClipConfig, make_batch, make_clip, parse_prompt, prompt_of,
)


def test_vocabulary_and_splits():
    assert set(SHAPES) == {"circle", "square", "triangle"}
    assert {"red", "green", "blue", "yellow"} <= set(COLOURS)
    assert len(DIRECTIONS) == 8
    assert len(ALL_COMBOS) == len(SHAPES) * len(COLOURS) * len(DIRECTIONS)
    assert set(SEEN_COMBOS).isdisjoint(HELD_OUT_COMBOS)
    assert set(SEEN_COMBOS) | set(HELD_OUT_COMBOS) == set(ALL_COMBOS)
    assert len(HELD_OUT_COMBOS) >= 3
    # every attribute pair of a held-out triple is still seen in training
    for h in HELD_OUT_COMBOS:
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert any(s[i] == h[i] and s[j] == h[j] for s in SEEN_COMBOS), h


def test_prompt_round_trip():
    for a in ALL_COMBOS:
        p = prompt_of(a)
        assert parse_prompt(p) == a
        assert parse_prompt(p.upper()) == a
    assert prompt_of(Attrs(0, 0, 4)) == "red circle moving up-left"
    with pytest.raises(ValueError, match="colour"):
        parse_prompt("purple circle moving up")
    with pytest.raises(ValueError, match="direction"):
        parse_prompt("red circle moving sideways")
    with pytest.raises(ValueError):
        parse_prompt("a red circle")


def test_clip_format_and_determinism():
    c = make_clip(Attrs(2, 3, 7), seed=123)
    assert c.video.shape == (3, 8, 32, 32) and c.video.dtype == torch.float32
    assert float(c.video.min()) >= -1 and float(c.video.max()) <= 1
    assert c.prompt == "yellow triangle moving down-right"
    assert c.attrs == Attrs(2, 3, 7)
    torch.testing.assert_close(make_clip(Attrs(2, 3, 7), seed=123).video, c.video, rtol=0, atol=0)
    assert not torch.equal(make_clip(Attrs(2, 3, 7), seed=124).video, c.video)
    # global RNG state is irrelevant
    torch.manual_seed(0); np.random.seed(0)
    a = make_clip(Attrs(1, 1, 1), seed=5).video
    torch.manual_seed(99); np.random.seed(99)
    torch.testing.assert_close(make_clip(Attrs(1, 1, 1), seed=5).video, a, rtol=0, atol=0)


def test_configurable_size_and_frames():
    c = make_clip(Attrs(0, 2, 3), seed=1, config=ClipConfig(frames=16, height=48, width=40, textured=False))
    assert c.video.shape == (3, 16, 48, 40)
    with pytest.raises(ValueError):
        ClipConfig(frames=1)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_motion_is_clear_and_in_the_stated_direction(direction):
    d = DIRECTIONS.index(direction)
    ux, uy = DIRECTION_VEC[direction]
    for seed in range(5):
        c = make_clip(Attrs(0, 0, d), seed=seed)
        tr = c.track
        v0 = tr[1] - tr[0]
        # initial velocity points the stated way, several pixels per frame overall
        assert np.sign(np.round(v0, 6)).tolist() == [float(ux), float(uy)]
        assert np.hypot(*v0) >= 1.7
        # the rendered object (red) is where the track says it is
        red = (c.video[0] > 0.9) & (c.video[1] < -0.9)
        for f in range(8):
            ys, xs = torch.nonzero(red[f], as_tuple=True)
            assert len(xs) > 20
            assert abs(float(xs.float().mean()) + 0.5 - tr[f, 0]) < 1.0
            assert abs(float(ys.float().mean()) + 0.5 - tr[f, 1]) < 1.5  # triangle centroid ~ centre


def test_bounces_stay_inside_and_some_clips_bounce():
    bounced = 0
    for seed in range(40):
        c = make_clip(Attrs(1, 2, seed % 8), seed=seed)
        tr = c.track
        r = ms.object_radius(ClipConfig())
        assert (tr >= r).all() and (tr <= 32 - r).all()
        v = np.diff(tr, axis=0)
        if (np.sign(v[1:]) * np.sign(v[:-1]) < 0).any():
            bounced += 1
    assert 0 < bounced < 40


def test_shapes_and_colours_render_distinctly():
    areas = {}
    for s, name in enumerate(SHAPES):
        v = make_clip(Attrs(s, 1, 0), seed=3, config=ClipConfig(textured=False)).video
        green = (v[1] > 0.9) & (v[0] < -0.9)
        areas[name] = float(green[0].sum())
    assert areas["circle"] > areas["triangle"] and areas["square"] > areas["triangle"]
    for c, name in enumerate(COLOURS):
        v = make_clip(Attrs(0, c, 0), seed=3).video
        rgb = torch.tensor(ms.COLOUR_RGB[name]).view(3, 1, 1)
        hit = ((v[:, 0] - rgb).abs() < 1e-6).all(0)
        assert int(hit.sum()) > 40


def test_make_batch_splits():
    b = make_batch(64, seed=7, split="train")
    assert b.video.shape == (64, 3, 8, 32, 32)
    assert len(b.prompts) == 64 and b.attrs.shape == (64, 3)
    assert all(Attrs(*a) in set(SEEN_COMBOS) for a in b.attrs.tolist())
    assert [parse_prompt(p) for p in b.prompts] == [Attrs(*a) for a in b.attrs.tolist()]
    h = make_batch(16, seed=7, split="held_out")
    assert all(Attrs(*a) in set(HELD_OUT_COMBOS) for a in h.attrs.tolist())
    torch.testing.assert_close(make_batch(8, seed=7).video, b.video[:8], rtol=0, atol=0)
    with pytest.raises(ValueError):
        make_batch(2, seed=0, split="test")
