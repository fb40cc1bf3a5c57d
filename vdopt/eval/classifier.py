"""The evaluation classifier: a small 3D conv net that reads a moving-shapes clip.

Three heads predict shape, colour and direction; the 128-d penultimate vector is the
feature space of FVD-MS (``vdopt.eval.metrics.fvd_ms``). It is trained on real clips
from the generator (all combos, augmented with noise and blur so that it judges slightly
imperfect generated clips fairly) by ``python -m vdopt.eval.train_classifier``; the
shipped weights are ``vdopt/eval/weights/classifier.safetensors``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from vdopt.data.moving_shapes import COLOURS, DIRECTIONS, SHAPES

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
FEATURE_DIM = 128


class ShapeClassifier(nn.Module):
    """Input ``[B, 3, F, H, W]`` in ``[-1, 1]`` (F = 8, H = W = 32 by default)."""

    def __init__(self, frames: int = 8, size: int = 32, width: int = 16, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.frames, self.size = frames, size
        w = width

        def block(cin, cout, pool):
            return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True), nn.MaxPool3d(pool))

        self.body = nn.Sequential(
            block(3, w, (1, 2, 2)),
            block(w, 2 * w, (2, 2, 2)),
            block(2 * w, 4 * w, (1, 1, 1)),
        )
        # translation-invariant read-out: mean and max over (frames, height, width)
        self.feature = nn.Sequential(nn.Linear(8 * w, feature_dim), nn.ReLU(inplace=True))
        self.shape_head = nn.Linear(feature_dim, len(SHAPES))
        self.colour_head = nn.Linear(feature_dim, len(COLOURS))
        self.direction_head = nn.Linear(feature_dim, len(DIRECTIONS))
        self.config = {"frames": frames, "size": size, "width": width, "feature_dim": feature_dim}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x).flatten(2)
        return self.feature(torch.cat([h.mean(2), h.amax(2)], dim=1))

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return self.shape_head(f), self.colour_head(f), self.direction_head(f), f

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (Long[B, 3] predicted (shape, colour, direction), Float[B, feature_dim])."""
        preds, feats = [], []
        for i in range(0, x.shape[0], batch):
            s, c, d, f = self(x[i:i + batch].float())
            preds.append(torch.stack([s.argmax(1), c.argmax(1), d.argmax(1)], dim=1))
            feats.append(f)
        if not preds:
            return torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, self.config["feature_dim"])
        return torch.cat(preds), torch.cat(feats)


def save_classifier(model: ShapeClassifier, out_dir, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps({"model": model.config, **(extra or {})}, indent=2))
    return out / WEIGHTS_FILE


_CACHE: dict = {}


def load_classifier(weights_dir=None) -> ShapeClassifier:
    """The shipped (or a given) classifier, in eval mode, cached per directory."""
    from safetensors.torch import load_file

    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    key = str(d.resolve())
    if key in _CACHE:
        return _CACHE[key]
    wf, cf = d / WEIGHTS_FILE, d / CONFIG_FILE
    if not wf.exists():
        raise FileNotFoundError(f"no classifier in {d}; train one with `python -m vdopt.eval.train_classifier --out {d}`")
    cfg = json.loads(cf.read_text())["model"] if cf.exists() else {}
    model = ShapeClassifier(**cfg)
    model.load_state_dict(load_file(str(wf)))
    model.eval().requires_grad_(False)
    _CACHE[key] = model
    return model
