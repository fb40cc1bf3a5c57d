"""Metrics that judge generated moving-shapes clips.

All clip tensors are ``[B, 3, F, H, W]`` (or ``[3, F, H, W]`` for one clip) in ``[-1, 1]``.

* :func:`attribute_accuracy` -- classifier predictions vs. the prompts' attributes.
* :func:`frechet_distance` / :func:`fvd_ms` -- FVD-MS: the Frechet distance between
  Gaussians fitted to the evaluation classifier's 128-d features of two sets of clips
  (the "MS" is for moving shapes: the feature network is ours, not I3D).
* :func:`psnr` / :func:`ssim` -- per clip against a reference clip (data range 2).
* :func:`object_track` / :func:`track_metrics` -- temporal consistency: the object's
  centroid per frame from a colour-distance mask against the background, and how steady
  the track is (bounce-invariant: the change of |velocity| per axis), plus the direction
  of the initial motion.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from vdopt.data.moving_shapes import DIRECTION_VEC, DIRECTIONS, parse_prompt

DATA_RANGE = 2.0


# ----------------------------------------------------------------------------- accuracy
def attrs_of_prompts(prompts: list[str]) -> torch.Tensor:
    return torch.tensor([list(parse_prompt(p)) for p in prompts], dtype=torch.long).reshape(-1, 3)


def attribute_accuracy(pred: torch.Tensor, target: torch.Tensor | list[str]) -> dict:
    """pred, target: Long[B, 3] (shape, colour, direction); target may be prompts.

    Returns per-attribute accuracy, ``all`` (all three right) and ``n``.
    """
    if isinstance(target, list):
        target = attrs_of_prompts(target)
    pred, target = pred.reshape(-1, 3).cpu(), target.reshape(-1, 3).cpu()
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    n = pred.shape[0]
    if n == 0:
        return {"shape": float("nan"), "colour": float("nan"), "direction": float("nan"), "all": float("nan"), "n": 0}
    ok = pred == target
    return {
        "shape": float(ok[:, 0].float().mean()),
        "colour": float(ok[:, 1].float().mean()),
        "direction": float(ok[:, 2].float().mean()),
        "all": float(ok.all(1).float().mean()),
        "n": n,
    }


# ----------------------------------------------------------------------------- FVD-MS
def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double().reshape(features.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError("need at least 2 feature vectors to fit a Gaussian")
    mu = f.mean(0)
    return mu, torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` in float64."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    r1 = _sqrtm_psd(s1)
    covmean_tr = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    d = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * covmean_tr
    return float(d.clamp_min(0))


def frechet_distance_features(fa: torch.Tensor, fb: torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))


def classifier_features(clips: torch.Tensor, classifier=None) -> torch.Tensor:
    from vdopt.eval.classifier import load_classifier

    clf = classifier if classifier is not None else load_classifier()
    return clf.predict(clips)[1]


def fvd_ms(clips_a: torch.Tensor, clips_b: torch.Tensor, classifier=None) -> float:
    """Frechet distance between the classifier features of two sets of clips."""
    return frechet_distance_features(classifier_features(clips_a, classifier), classifier_features(clips_b, classifier))


# ----------------------------------------------------------------------------- PSNR / SSIM
def _as_batch(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 4 else x


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-clip PSNR in dB (``inf`` where identical). Returns Float[B]."""
    x, ref = _as_batch(x).double(), _as_batch(ref).double()
    mse = (x - ref).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()  # mse == 0 -> inf


def _gauss_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = DATA_RANGE, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-clip SSIM (Wang et al. 2004, Gaussian window, per frame and channel, averaged). Float[B]."""
    x, ref = _as_batch(x).float(), _as_batch(ref).float()
    B, C, Fr, H, W = x.shape
    a = x.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    b = ref.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    k = _gauss_window(window, sigma).to(a)[None, None].expand(C, 1, window, window)
    filt = lambda t: F.conv2d(t, k, groups=C)  # noqa: E731  (valid window)
    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a**2
    sbb = filt(b * b) - mu_b**2
    sab = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return m.reshape(B, -1).mean(1).float()


# ----------------------------------------------------------------------------- tracks
def object_mask(clip: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """Bool[F, H, W]: pixels whose colour is far from the background (the per-frame median colour)."""
    clip = clip.float()
    bg = clip.flatten(2).median(dim=2).values  # [3, F]
    dist = (clip - bg[:, :, None, None]).pow(2).sum(0).sqrt()
    return dist > threshold


def object_track(clip: torch.Tensor, threshold: float = 0.6, min_pixels: int = 4) -> np.ndarray:
    """Float[F, 2] centroid (x, y) in pixels per frame (pixel centres at +0.5); NaN where not found."""
    mask = object_mask(clip, threshold)
    Fr, H, W = mask.shape
    ys = torch.arange(H, dtype=torch.float64) + 0.5
    xs = torch.arange(W, dtype=torch.float64) + 0.5
    m = mask.double()
    cnt = m.sum((1, 2))
    cx = (m.sum(1) * xs).sum(1) / cnt.clamp_min(1)
    cy = (m.sum(2) * ys).sum(1) / cnt.clamp_min(1)
    tr = torch.stack([cx, cy], 1).numpy()
    tr[(cnt < min_pixels).numpy()] = np.nan
    return tr


def direction_of_motion(track: np.ndarray, frames: int = 3, min_speed: float = 0.5) -> int | None:
    """Index into DIRECTIONS of the initial motion (first ``frames`` steps), or None if still/lost."""
    v = np.diff(track[: frames + 1], axis=0)
    if np.isnan(v).any() or len(v) == 0:
        return None
    d = v.mean(0)
    if np.hypot(*d) < min_speed:
        return None
    ang = math.atan2(d[1], d[0])
    best, best_cos = None, -2.0
    for i, name in enumerate(DIRECTIONS):
        ux, uy = DIRECTION_VEC[name]
        c = (ux * math.cos(ang) + uy * math.sin(ang)) / math.hypot(ux, uy)
        if c > best_cos:
            best, best_cos = i, c
    return best


def track_metrics(track: np.ndarray) -> dict:
    """Steadiness of one track.

    ``jitter``: mean over frames of the change of per-axis |velocity| (px/frame); 0 for a
    constant-velocity track and unchanged by clean reflections off a border.
    ``score`` = exp(-jitter) in (0, 1]; ``tracked`` = fraction of frames with an object.
    """
    ok = ~np.isnan(track).any(1)
    tracked = float(ok.mean()) if len(ok) else 0.0
    if ok.sum() < 3 or not ok.all():
        return {"jitter": float("nan"), "score": 0.0, "tracked": tracked, "speed": float("nan"), "direction": None}
    v = np.diff(track, axis=0)
    jitter = float(np.abs(np.diff(np.abs(v), axis=0)).sum(1).mean())
    return {"jitter": jitter, "score": math.exp(-jitter), "tracked": tracked,
            "speed": float(np.hypot(v[:, 0], v[:, 1]).mean()), "direction": direction_of_motion(track)}


def per_clip_tracks(clips: torch.Tensor) -> list[dict]:
    return [track_metrics(object_track(c)) for c in _as_batch(clips)]


def temporal_consistency(clips: torch.Tensor | list[dict], target_directions: torch.Tensor | None = None) -> dict:
    """Aggregate :func:`track_metrics` over a batch (clips, or their :func:`per_clip_tracks`);
    with targets also the track-direction accuracy."""
    per = clips if isinstance(clips, list) else per_clip_tracks(clips)
    jit = np.array([p["jitter"] for p in per], dtype=np.float64)
    valid = ~np.isnan(jit)
    out = {
        "n": len(per),
        "tracked_fraction": float(np.mean([p["tracked"] for p in per])) if per else float("nan"),
        "fully_tracked": float(valid.mean()) if per else float("nan"),
        "jitter_px": float(jit[valid].mean()) if valid.any() else float("nan"),
        "score": float(np.mean([p["score"] for p in per])) if per else float("nan"),
    }
    if target_directions is not None:
        td = target_directions.reshape(-1).tolist()
        out["track_direction_accuracy"] = float(np.mean([p["direction"] == t for p, t in zip(per, td)])) if per else float("nan")
    return out
