"""`vdopt run --trace`: what the cache decided, per step and per (sample, guidance branch) row.

Each step records the probe distance the policy compared, whether the body was recomputed and,
for `adacache` with MoReg, the motion score (the state keeps the score of the last recomputed step).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class CacheTrace:
    def __init__(self, manifest: dict):
        self.names = [s["name"] for s in manifest["state"]]
        self.guidance = manifest["guidance"]
        self.steps: list[dict] = []
        self._computed = None

    @property
    def rows(self) -> list[str]:
        branches = ("cond", "uncond") if self.guidance else ("cond",)
        samples = len(self.steps[0]["computed"]) // len(branches) if self.steps else 0
        return [f"sample {s} {b}" for b in branches for s in range(samples)]

    def on_step(self, i: int, state: list[torch.Tensor]) -> None:
        values = dict(zip(self.names, state))
        if "state.computed" not in values:
            return
        computed = values["state.computed"].cpu()
        before = self._computed if self._computed is not None else torch.zeros_like(computed)
        self._computed = computed
        record = {"step": i, "computed": (computed - before).tolist(), "distance": values["state.distance"].cpu().tolist()}
        if "state.motion" in values:
            record["motion"] = values["state.motion"].cpu().tolist()
        self.steps.append(record)

    def body_evaluations(self) -> list[int]:
        return self._computed.tolist() if self._computed is not None else []

    def write(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(json.dumps({"rows": self.rows, "steps": self.steps, "body_evaluations": self.body_evaluations()}, indent=1))
        self.plot(path.with_suffix(".png"))

    def plot(self, path: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(8, 3.8))
        steps = [s["step"] for s in self.steps]
        for r, row in enumerate(self.rows):
            distance = [s["distance"][r] for s in self.steps]
            line, = ax.plot(steps, distance, label=f"{row} distance")
            hits = [st for st, s in zip(steps, self.steps) if s["computed"][r]]
            ax.scatter(hits, [distance[steps.index(h)] for h in hits], color=line.get_color(), marker="o", s=18)
        ax.set_xlabel("step (dots: body recomputed)")
        ax.set_ylabel("probe distance")
        ax.set_yscale("symlog", linthresh=1e-3)
        # the first step compares against an empty probe: its distance is huge and says nothing
        later = [d for s in self.steps[1:] for d in s["distance"]]
        if later and max(later) > 0:
            ax.set_ylim(top=2 * max(later))
        handles, labels = ax.get_legend_handles_labels()
        if self.steps and "motion" in self.steps[0]:
            motion_ax = ax.twinx()
            for r, row in enumerate(self.rows):
                motion_ax.plot(steps, [s["motion"][r] for s in self.steps], linestyle="--", linewidth=1, label=f"{row} motion")
            motion_ax.set_ylabel("MoReg motion score (dashed)")
            more = motion_ax.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        fig.legend(handles, labels, fontsize=7, loc="upper center", ncol=4, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.92))
        fig.savefig(path, dpi=110)
        plt.close(fig)
