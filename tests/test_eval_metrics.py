import math

import numpy as np
import pytest
import torch

from vdopt.data.moving_shapes import DIRECTIONS, Attrs, ClipConfig, make_clip, prompt_of
from vdopt.eval import metrics as M


def test_attribute_accuracy_against_prompts():
    prompts = [prompt_of(Attrs(0, 1, 2)), prompt_of(Attrs(2, 3, 7)), prompt_of(Attrs(1, 0, 4)), prompt_of(Attrs(1, 1, 1))]
    pred = torch.tensor([[0, 1, 2], [2, 0, 7], [1, 0, 5], [0, 1, 1]])
    acc = M.attribute_accuracy(pred, prompts)
    assert acc == {"shape": 0.75, "colour": 0.75, "direction": 0.75, "all": 0.25, "n": 4}
    with pytest.raises(ValueError):
        M.attribute_accuracy(pred[:3], prompts)


def test_frechet_identical_sets_is_zero():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(300, 16, generator=g) @ torch.randn(16, 16, generator=g)
    assert M.frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-6)


def test_frechet_mean_shift_known_value():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(500, 12, generator=g) * torch.linspace(0.5, 2.0, 12)
    shift = torch.linspace(-1, 1, 12)
    # same covariance, shifted mean -> |shift|^2 exactly
    assert M.frechet_distance_features(f, f + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-6)


def test_frechet_closed_form_for_diagonal_gaussians():
    mu1, mu2 = torch.zeros(3), torch.tensor([1.0, 0.0, 2.0])
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0, 9.0])), torch.diag(torch.tensor([4.0, 4.0, 1.0]))
    # sum (sqrt(a) - sqrt(b))^2 + |mu|^2 = (1-2)^2 + 0 + (3-1)^2 + 5 = 10
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(10.0, rel=1e-9)
    # symmetric
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(10.0, rel=1e-9)


def test_psnr_identical_and_known_noise():
    x = make_clip(Attrs(0, 0, 0), seed=0).video.unsqueeze(0).repeat(2, 1, 1, 1, 1)
    p = M.psnr(x, x)
    assert torch.isinf(p).all()
    # exact +-0.1 perturbation -> mse 0.01 -> PSNR = 10 log10(4 / 0.01) = 26.0206 dB
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1
    y = x + 0.1 * sign
    torch.testing.assert_close(M.psnr(y, x), torch.full((2,), 10 * math.log10(4 / 0.01)), rtol=1e-5, atol=1e-4)
    # a second clip with more noise gets a lower PSNR, per clip
    y[1] = x[1] + 0.2 * sign[1]
    p = M.psnr(y, x)
    assert p[1] == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-3) and p[0] > p[1]


def test_ssim_identical_is_one_and_decreases_with_noise():
    x = make_clip(Attrs(1, 2, 3), seed=4).video
    torch.testing.assert_close(M.ssim(x, x), torch.ones(1), rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    n = torch.randn(x.shape, generator=g)
    s1, s2 = float(M.ssim(x + 0.05 * n, x)), float(M.ssim(x + 0.3 * n, x))
    assert 1.0 > s1 > s2 > 0.0
    # constant images: SSIM from the luminance term only: (2ab + c1) / (a^2 + b^2 + c1)
    a, b = torch.full((3, 2, 16, 16), 0.5), torch.full((3, 2, 16, 16), -0.5)
    c1 = (0.01 * 2) ** 2
    assert float(M.ssim(a, b)) == pytest.approx((2 * 0.5 * -0.5 + c1) / (0.25 + 0.25 + c1), rel=1e-4)  # float32


def _blob_clip(positions, size=32, r=4.0):
    """A white disc on a grey background at given (x, y) per frame."""
    F = len(positions)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    v = torch.full((3, F, size, size), -0.2)
    for f, (x, y) in enumerate(positions):
        m = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
        v[:, f][:, m] = 1.0
    return v


def test_track_constant_velocity_is_perfect_and_gives_known_direction():
    pos = [(6 + 3 * f, 24 - 2 * f) for f in range(8)]  # right and up (y decreases)
    tr = M.object_track(_blob_clip(pos))
    np.testing.assert_allclose(tr, np.array(pos, dtype=float), atol=1e-6)
    m = M.track_metrics(tr)
    assert m["jitter"] == pytest.approx(0.0, abs=1e-9) and m["score"] == pytest.approx(1.0)
    assert m["tracked"] == 1.0
    assert DIRECTIONS[m["direction"]] == "up-right"
    assert m["speed"] == pytest.approx(math.hypot(3, 2), rel=1e-6)


def test_track_jitter_scores_worse_and_bounce_is_free():
    steady = [(6 + 2 * f, 16) for f in range(8)]
    jittered = [(6 + 2 * f + (1.0 if f % 2 else -1.0), 16) for f in range(8)]
    bounce = [(17 + 3 * f if f < 4 else 26 - 3 * (f - 3), 10) for f in range(8)]  # 17,20,23,26,23,20,17,14
    ms, mj, mb = (M.track_metrics(M.object_track(_blob_clip(p))) for p in (steady, jittered, bounce))
    assert ms["jitter"] == pytest.approx(0.0, abs=1e-9)
    assert mj["jitter"] > 1.0 and mj["score"] < ms["score"]
    assert mb["jitter"] == pytest.approx(0.0, abs=1e-9)
    assert DIRECTIONS[mb["direction"]] == "right"


def test_track_lost_object_and_batch_summary():
    empty = torch.full((3, 8, 32, 32), -0.2)
    m = M.track_metrics(M.object_track(empty))
    assert m["tracked"] == 0.0 and m["score"] == 0.0 and m["direction"] is None
    clips = torch.stack([make_clip(Attrs(0, c, d), seed=10 + d, config=ClipConfig(textured=False)).video
                         for c, d in ((0, 3), (1, 0), (3, 6))])
    s = M.temporal_consistency(torch.cat([clips, empty[None]]), torch.tensor([3, 0, 6, 1]))
    assert s["n"] == 4 and s["fully_tracked"] == 0.75
    assert s["track_direction_accuracy"] == 0.75  # the three real clips right, the empty one wrong


def test_real_clips_track_their_prompted_direction():
    ok = 0
    for d in range(8):
        for seed in range(3):
            c = make_clip(Attrs(seed % 3, seed % 4, d), seed=100 + 8 * seed + d)
            m = M.track_metrics(M.object_track(c.video))
            ok += m["direction"] == d
            assert m["tracked"] == 1.0
    assert ok >= 23  # of 24
