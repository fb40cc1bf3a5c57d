"""Measuring a bundle against another on the same prompts and seeds: clips, PSNR statistics, accuracy.

`vdopt compile --verify` (contract 8), `vdopt calibrate` and the differential tests all render the
same inputs through two bundles and compare the clips; this module is the one place that does it.
A mean hides the clip a user will complain about, so every summary reports the worst clip and the
5th percentile beside the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from vdopt.errors import VdoptError

PSNR_CAP = 100.0  # dB: an identical clip counts as this, so one perfect clip cannot make the mean infinite


@dataclass
class Inputs:
    """Per prompt: (label, cond, uncond, seed). Prompts go through the bundle's encoder when it has one;
    families without one get fixed random conditioning tensors (`prompts` is then just a count)."""

    items: list[tuple[str, dict, dict | None, int]]
    pixel_space: bool

    @property
    def labels(self) -> list[str]:
        return [label for label, *_ in self.items]


def make_inputs(session, prompts: int | Sequence[str], seed: int) -> Inputs:
    encoder = session.prompt_encoder()
    if encoder is not None:
        if isinstance(prompts, int):
            from vdopt.eval.suite import prompt_set

            names, seeds, _ = prompt_set(prompts, seed)
        else:
            names, seeds = list(prompts), [seed * 100_003 + i for i in range(len(prompts))]
        return Inputs([(p, *encoder(p), s) for p, s in zip(names, seeds)], pixel_space=True)
    if not isinstance(prompts, int):
        raise VdoptError(f"this {session.manifest['family']} bundle has no prompt encoder, so text prompts cannot be "
                         f"used; give a number of prompts (random conditioning with fixed seeds).")
    from vdopt.program import DTYPES

    items = []
    for k in range(prompts):
        generator = torch.Generator().manual_seed(seed * 100_003 + k)
        cond = {s.name.removeprefix("cond."): torch.randn(list(s.shape), generator=generator).to(DTYPES[s.dtype])
                for s in session.inputs if s.name.startswith("cond.")}
        items.append((f"random cond {k}", cond, None, seed * 100_003 + k))
    return Inputs(items, pixel_space=False)


def render(session, inputs: Inputs, tick: Callable[[], None] = lambda: None) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Runs every prompt; returns the outputs and, per prompt, the cache trace's steps (empty if uncached)."""
    from vdopt.runtime.trace import CacheTrace

    clips, traces = [], []
    for _, cond, uncond, seed in inputs.items:
        trace = CacheTrace(session.manifest)
        x = session.run(cond, uncond, seed=seed, progress=False, on_step=trace.on_step).float()
        clips.append(x.clamp(-1, 1) if inputs.pixel_space else x)
        traces.append(trace.steps)
        tick()
    return clips, traces


def clip_psnr(clips: list[torch.Tensor], refs: list[torch.Tensor]) -> torch.Tensor:
    """PSNR of each clip against its reference, capped at PSNR_CAP."""
    from vdopt.eval.metrics import psnr

    return torch.cat([psnr(c, r).clamp(max=PSNR_CAP) for c, r in zip(clips, refs)])


@dataclass(frozen=True)
class PsnrStats:
    mean: float
    worst: float
    p5: float  # 5th percentile: the clip one user in twenty sees

    @classmethod
    def of(cls, values: torch.Tensor) -> "PsnrStats":
        values = values.double()
        return cls(float(values.mean()), float(values.min()), float(torch.quantile(values, 0.05)))

    def to_json(self) -> dict[str, float]:
        return {"psnr_mean": round(self.mean, 3), "psnr_worst": round(self.worst, 3), "psnr_p5": round(self.p5, 3)}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "PsnrStats":
        return cls(record["psnr_mean"], record["psnr_worst"], record["psnr_p5"])

    def __str__(self) -> str:
        return f"mean PSNR {self.mean:.2f} dB (worst clip {self.worst:.2f} dB, 5th percentile {self.p5:.2f} dB)"


def attribute_accuracy(clips: list[torch.Tensor], prompts: list[str]) -> dict[str, float]:
    """The evaluation classifier's accuracy on pixel-space clips of moving-shapes prompts, in percent."""
    from vdopt.eval.classifier import load_classifier
    from vdopt.eval.metrics import attribute_accuracy as accuracy

    predicted, _ = load_classifier().predict(torch.cat(clips))
    result = accuracy(predicted, prompts)
    return {k: round(100 * result[k], 2) for k in ("shape", "colour", "direction", "all")}


@dataclass(frozen=True)
class Budget:
    """Lower bounds on PSNR against the unoptimised program (dB) and an upper bound on the attribute
    accuracy lost (points of all-three-right accuracy, for families the evaluation classifier knows)."""

    psnr_mean: float | None = None
    psnr_worst: float | None = None
    psnr_p5: float | None = None
    accuracy_drop: float | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.psnr_mean, self.psnr_worst, self.psnr_p5, self.accuracy_drop))

    def to_json(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def misses(self, stats: PsnrStats, accuracy_drop: float | None = None) -> list[str]:
        """What the measurement fails, as phrases; empty when it is within the budget."""
        missed = [f"{label} {value:.2f} dB < {bound:g} dB"
                  for label, value, bound in (("mean PSNR", stats.mean, self.psnr_mean), ("worst-clip PSNR", stats.worst, self.psnr_worst),
                                              ("5th-percentile PSNR", stats.p5, self.psnr_p5))
                  if bound is not None and value < bound]
        if self.accuracy_drop is not None and accuracy_drop is not None and accuracy_drop > self.accuracy_drop:
            missed.append(f"attribute accuracy drops {accuracy_drop:.1f} points > {self.accuracy_drop:g}")
        return missed
