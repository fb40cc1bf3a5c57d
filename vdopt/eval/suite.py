"""The evaluation suite: judge a video generator on moving-shapes prompts.

    evaluate(generate_fn, prompts_n, seed, reference_fn=None) -> dict

``generate_fn(prompts: list[str], seeds: list[int]) -> Tensor[B, 3, F, H, W]`` in [-1, 1]
generates one clip per (prompt, seed); clip *i* must depend only on its own prompt and
seed (so optimised and reference generators can be compared clip by clip).

Measured, for seen and held-out prompts separately and overall:

* attribute accuracy (shape / colour / direction / all three) by the evaluation classifier;
* FVD-MS against real clips of the same prompts, and the floor: FVD-MS between two
  disjoint real sets of the same prompts (a generator cannot be expected to go below it);
* temporal consistency of the object track (jitter px/frame, tracked fraction, direction
  of the track vs. the prompt), with the real clips' values alongside;
* with ``reference_fn``: PSNR and SSIM of every clip against the reference generator's
  clip for the same prompt and seed, and FVD-MS between the two generated sets.

Prompt set: ``prompts_n`` prompts, a quarter (at least 1) from ``HELD_OUT_COMBOS`` and the
rest from ``SEEN_COMBOS``, drawn deterministically from ``seed``; clip *i* uses seed
``seed * 100_003 + i``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vdopt.data.moving_shapes import HELD_OUT_COMBOS, make_clip, prompt_of, sample_attrs
from vdopt.eval import metrics as M
from vdopt.eval.classifier import load_classifier

GenerateFn = Callable[[list[str], list[int]], torch.Tensor]
QUICK_N = 16
FULL_N = 256
REAL_SEED_A = 7_000_000
REAL_SEED_B = 8_000_000


def prompt_set(n: int, seed: int) -> tuple[list[str], list[int], list[bool]]:
    """(prompts, per-clip seeds, is_held_out) for an evaluation of ``n`` clips."""
    n_held = max(1, n // 4) if n >= 2 else 0
    seen = sample_attrs(n - n_held, seed, "train")
    held = sample_attrs(n_held, seed + 1, "held_out")
    attrs = seen + held
    return [prompt_of(a) for a in attrs], [seed * 100_003 + i for i in range(n)], [a in set(HELD_OUT_COMBOS) for a in attrs]


def real_clips(prompts: list[str], base_seed: int) -> torch.Tensor:
    return torch.stack([make_clip(M.attrs_of_prompts([p])[0].tolist(), base_seed + i).video for i, p in enumerate(prompts)])


def _generate(fn: GenerateFn, prompts, seeds, batch: int) -> torch.Tensor:
    outs = []
    for i in range(0, len(prompts), batch):
        v = fn(prompts[i:i + batch], seeds[i:i + batch])
        outs.append(v.detach().float().cpu().clamp(-1, 1))
    return torch.cat(outs)


def _fvd(fa: torch.Tensor, fb: torch.Tensor) -> float:
    if fa.shape[0] < 2 or fb.shape[0] < 2:
        return float("nan")
    return M.frechet_distance_features(fa, fb)


def _finite_mean(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else float("inf")


def evaluate(
    generate_fn: GenerateFn,
    prompts_n: int = FULL_N,
    seed: int = 0,
    reference_fn: GenerateFn | None = None,
    *,
    batch: int = 32,
    classifier=None,
    json_path: str | Path | None = None,
    sheet_path: str | Path | None = None,
    sheet_clips: int = 8,
    label: str = "generated",
    reference_label: str = "reference",
    progress: bool = True,
    reference_videos: torch.Tensor | None = None,
) -> dict:
    """Run the suite; returns (and optionally writes) a JSON-able dict of metrics.

    ``reference_videos`` may be given instead of ``reference_fn`` when the reference
    clips for this ``(prompts_n, seed)`` were already generated (see ``result["_videos"]``
    which is returned, not written, so a caller can reuse them).
    """
    clf = classifier if classifier is not None else load_classifier()
    prompts, seeds, held = prompt_set(prompts_n, seed)
    held_t = torch.tensor(held, dtype=torch.bool)
    target = M.attrs_of_prompts(prompts)

    timings = {}
    t0 = time.perf_counter()
    videos = _generate(generate_fn, prompts, seeds, batch)
    timings["generate_s"] = time.perf_counter() - t0
    if videos.shape[0] != len(prompts) or videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"generate_fn returned {tuple(videos.shape)}; expected [{len(prompts)}, 3, F, H, W]")
    ref = reference_videos
    if ref is None and reference_fn is not None:
        t0 = time.perf_counter()
        ref = _generate(reference_fn, prompts, seeds, batch)
        timings["reference_generate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    real_a, real_b = real_clips(prompts, REAL_SEED_A + seed), real_clips(prompts, REAL_SEED_B + seed)
    pred, feats = clf.predict(videos)
    _, feats_a = clf.predict(real_a)
    _, feats_b = clf.predict(real_b)
    pred_real, _ = clf.predict(real_a)
    ref_feats = clf.predict(ref)[1] if ref is not None else None
    pred_ref = clf.predict(ref)[0] if ref is not None else None
    tracks, real_tracks = M.per_clip_tracks(videos), M.per_clip_tracks(real_a)
    if ref is not None:
        psnr_all, ssim_all = M.psnr(videos, ref), M.ssim(videos, ref)

    def split_metrics(mask: torch.Tensor) -> dict:
        idx = mask.nonzero().flatten()
        il = idx.tolist()
        out = {
            "n": int(idx.numel()),
            "accuracy": M.attribute_accuracy(pred[idx], target[idx]),
            "real_accuracy": M.attribute_accuracy(pred_real[idx], target[idx]),
            "fvd_ms": _fvd(feats[idx], feats_a[idx]),
            "fvd_ms_floor": _fvd(feats_b[idx], feats_a[idx]),
            "temporal": M.temporal_consistency([tracks[i] for i in il], target[idx, 2]),
            "real_temporal": M.temporal_consistency([real_tracks[i] for i in il], target[idx, 2]),
        }
        if ref is not None:
            p = psnr_all[idx]
            out["vs_reference"] = {
                "psnr_db": _finite_mean(p),
                "psnr_db_median": float(p.median()) if p.numel() else float("nan"),
                "psnr_db_worst": float(p.min()) if p.numel() else float("nan"),
                "psnr_db_p5": float(torch.quantile(p.double(), 0.05)) if p.numel() else float("nan"),
                "identical_clips": int(torch.isinf(p).sum()),
                "ssim": float(ssim_all[idx].mean()) if idx.numel() else float("nan"),
                "fvd_ms": _fvd(feats[idx], ref_feats[idx]),
                "reference_fvd_ms_vs_real": _fvd(ref_feats[idx], feats_a[idx]),
                "reference_accuracy": M.attribute_accuracy(pred_ref[idx], target[idx]),
            }
        return out

    result = {
        "label": label,
        "prompts_n": prompts_n,
        "seed": seed,
        "frames_hw": list(videos.shape[2:]),
        "all": split_metrics(torch.ones_like(held_t)),
        "seen": split_metrics(~held_t),
        "held_out": split_metrics(held_t),
    }
    timings["metrics_s"] = time.perf_counter() - t0
    result["timings"] = {k: round(v, 2) for k, v in timings.items()}
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, default=_json_default))
    if sheet_path is not None:
        rows = [(label, videos)]
        rows.append((reference_label, ref) if ref is not None else ("real", real_a))
        contact_sheet(rows, prompts, sheet_path, clips=sheet_clips, pick=_sheet_pick(held, sheet_clips))
    result["_videos"] = videos  # for reuse by the caller; dropped by to_json()
    result["_reference_videos"] = ref
    return result


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return None
    return str(o)


def to_json(result: dict) -> str:
    return json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2, default=_json_default)


def _sheet_pick(held: list[bool], k: int) -> list[int]:
    seen_idx = [i for i, h in enumerate(held) if not h]
    held_idx = [i for i, h in enumerate(held) if h]
    n_held = min(len(held_idx), max(1, k // 4)) if held_idx else 0
    return (seen_idx[: k - n_held] + held_idx[:n_held])[:k]


def contact_sheet(rows: list[tuple[str, torch.Tensor]], prompts: list[str], path, clips: int = 8,
                  pick: list[int] | None = None, scale: int = 3) -> Path:
    """A PNG: for each picked clip, a caption then one row per (label, videos), frames left to right."""
    from PIL import Image, ImageDraw

    pick = pick if pick is not None else list(range(min(clips, len(prompts))))
    _, _, Fr, H, W = rows[0][1].shape
    h, w = H * scale, W * scale
    gap, cap, lab = 4, 14, 130
    row_h = h + gap
    block_h = cap + row_h * len(rows) + 6
    img = Image.new("RGB", (lab + Fr * (w + gap), block_h * len(pick)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for bi, i in enumerate(pick):
        y0 = bi * block_h
        draw.text((4, y0 + 1), f"#{i} {prompts[i]}", fill=(0, 0, 0))
        for ri, (name, vids) in enumerate(rows):
            y = y0 + cap + ri * row_h
            draw.text((4, y + h // 2 - 6), name[:21], fill=(0, 0, 0))
            frames = ((vids[i].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
            for f in range(Fr):
                tile = Image.fromarray(frames[f]).resize((w, h), Image.NEAREST)
                img.paste(tile, (lab + f * (w + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def summary_lines(result: dict) -> list[str]:
    """Human-readable lines for the CLI."""
    lines = []
    for split in ("seen", "held_out", "all"):
        r = result[split]
        a = r["accuracy"]
        line = (f"{split:>8} n={r['n']:<4} acc shape {a['shape']:.3f} colour {a['colour']:.3f} "
                f"direction {a['direction']:.3f} all {a['all']:.3f} | FVD-MS {r['fvd_ms']:.2f} (floor {r['fvd_ms_floor']:.2f}) "
                f"| jitter {r['temporal']['jitter_px']:.3f}px (real {r['real_temporal']['jitter_px']:.3f})")
        if "vs_reference" in r:
            v = r["vs_reference"]
            line += (f" | vs ref PSNR {v['psnr_db']:.2f} dB (worst {v['psnr_db_worst']:.2f}, p5 {v['psnr_db_p5']:.2f}) "
                     f"SSIM {v['ssim']:.4f} FVD-MS {v['fvd_ms']:.2f}")
        lines.append(line)
    t = result.get("timings", {})
    lines.append("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    return lines


def teacher_generate_fn(transformer=None, conditioner=None, steps: int = 50, guidance_scale: float | None = None,
                        shift: float | None = None) -> GenerateFn:
    """generate_fn for the reference teacher via ``vdopt.reference.sample`` (per-clip noise from its seed)."""
    from vdopt.reference.model import DEFAULT_GUIDANCE, DEFAULT_SHIFT, load_reference
    from vdopt.reference.sample import initial_noise, sample

    if transformer is None:
        transformer, conditioner = load_reference()
    g = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
    s = DEFAULT_SHIFT if shift is None else shift
    cfg = transformer.config

    def fn(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        noise = torch.cat([initial_noise(1, sd, cfg.video_length, cfg.sample_size, cfg.sample_size, cfg.out_channels) for sd in seeds])
        return sample(transformer, conditioner, prompts, seed=seeds[0], steps=steps, guidance_scale=g, shift=s, noise=noise)

    return fn
