"""The README's caching tables, printed as Markdown from a results file: for `bench/cache.py`'s, the
held-out table, then every calibrated policy's PSNR at equal body evaluations saved; for
`bench/cache_hooks.py`'s, the side-by-side table, then every diffusers hook setting tried.

    python bench/cache_table.py [bench/results/cache.json | bench/results/cache_hooks.json]

Row names and the parameters shown are those `tests/test_readme_figures.py` checks the README against.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = {  # README row -> bench/cache.py row
    "uncached": "uncached",
    "static": "static:max_reuse=-1,first=0",
    "static + forecast": "static:max_reuse=-1,first=0,forecast=1",
    "first_blocks": "first_blocks:max_reuse=10",
    "adacache (MoReg)": "adacache",
    "adacache, no MoReg": "adacache:moreg=false",
    "teacache": "teacache:max_reuse=10,first=0",
    "teacache + forecast": "teacache:max_reuse=10,first=0,forecast=0.5",
    "body never runs (floor)": "floor",
}
DECIDES = {  # what a policy's skip decision reads
    "static": "step index (a fixed schedule)",
    "teacache": "timestep embedding (the same steps for every prompt)",
    "first_blocks": "first blocks' residual, per row",
    "adacache": "residual change x motion score, per row",
}
LEVELS = (0.5, 0.6, 0.7, 0.8)  # body evaluations saved at which the equal-savings table compares policies
HEAD = ("| policy | params | body evaluations saved | steps with no body | wall-clock speedup | PSNR vs uncached | worst clip "
        "| SSIM | accuracy shape / colour / direction | FVD-MS vs real (floor 1.5) |")


def shown_params(row: dict) -> str:
    params = row["params"]
    if params is None or row["body_evals_saved"] == 1.0:
        return "–"
    out = []
    for key, value in params.items():
        if key in ("policy", "moreg") or (key == "max_reuse" and value == -1):
            continue
        out.append(f"codebook `{value}`" if key == "codebook" else f"{key} {value:g}" if isinstance(value, (int, float)) else f"{key} {value}")
    return ", ".join(out)


def db(row: dict, key: str) -> str:
    """A PSNR cell: ∞ for the uncached row (no reference), '?' for results from before worst-clip PSNR was kept."""
    if "psnr_db" not in row:
        return "∞"
    return f"{row[key]:.2f}" if key in row else "?"


def table(results: dict) -> str:
    lines = [HEAD, "|" + "---|" * (HEAD.count("|") - 1)]
    for label, key in ROWS.items():
        row = results["rows"].get(key)
        if row is None:
            continue
        acc = row["accuracy"]
        speed = f"{row['speedup']:.2f}×" + (f" ({row['seconds_median']:.2f} s)" if row["params"] is None else "")
        name = f"**{label}**" if key == results["best"] else label
        lines.append(f"| {name} | {shown_params(row)} | {100 * row['body_evals_saved']:.1f} % | {100 * row['steps_without_body']:.1f} % "
                     f"| {speed} | {db(row, 'psnr_db')} | {db(row, 'psnr_db_worst')} | {row.get('ssim', 1.0):.3f} "
                     f"| {100 * acc['shape']:.1f} / {100 * acc['colour']:.0f} / {100 * acc['direction']:.0f} % | {row['fvd_ms_vs_real']:.1f} |")
    return "\n".join(lines)


def psnr_at(trials: list[dict], saved: float, key: str = "psnr_mean") -> float | None:
    """A calibration trials' PSNR statistic at a fraction of body evaluations saved, interpolated linearly
    between the trials around it (None outside them)."""
    points = sorted((t["body_evals_saved"], t[key]) for t in trials)
    for (s0, p0), (s1, p1) in zip(points, points[1:]):
        if s0 <= saved <= s1:
            return p0 if s1 == s0 else p0 + (p1 - p0) * (saved - s0) / (s1 - s0)
    return None


def equal_savings_table(results: dict) -> str:
    """Each calibrated policy's mean / worst-clip PSNR at the same fractions of body evaluations saved,
    from its calibration trials (the calibration prompts)."""
    head = "| policy | decides from | " + " | ".join(f"{100 * level:.0f} % saved" for level in LEVELS) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, key in ROWS.items():
        row = results["rows"].get(key)
        if row is None or "calibration" not in row:
            continue
        trials = row["calibration"]["trials"]
        cells = []
        for level in LEVELS:
            mean, worst = psnr_at(trials, level), psnr_at(trials, level, "psnr_worst")
            cells.append("–" if mean is None else f"{mean:.2f} / {worst:.2f}")
        lines.append(f"| {label} | {DECIDES[row['params']['policy']]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


HOOKS_HEAD = ("| row | setting | work skipped | clip s: median | worst round | speedup vs eager loop | PSNR vs uncached "
              "| worst clip | accuracy shape / colour / direction |")


def work_text(work: dict) -> str:
    if "body_evals_saved" in work:
        return f"{100 * work['body_evals_saved']:.1f} % of body evaluations"
    return f"{100 * work['blocks_skipped']:.1f} % of blocks, {100 * work['attentions_skipped']:.1f} % of attentions"


def setting_text(setting: dict | None) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in setting.items()) if setting else "–"


def hooks_table(results: dict) -> str:
    lines = [HOOKS_HEAD, "|" + "---|" * (HOOKS_HEAD.count("|") - 1)]
    for name, row in results["rows"].items():
        acc = row["accuracy"]
        dominating = {c["dominating"] for c in results["comparison"].values()}
        label = f"**{name}**" if name in dominating else name
        lines.append(f"| {label} | {setting_text(row['setting'])} | {work_text(row['work'])} | {row['seconds_median']:.3f} "
                     f"| {row['seconds_worst']:.3f} | {row['speedup_vs_eager']:.2f}× | {db(row, 'psnr_db')} | {db(row, 'psnr_db_worst')} "
                     f"| {100 * acc['shape']:.1f} / {100 * acc['colour']:.0f} / {100 * acc['direction']:.0f} % |")
    return "\n".join(lines)


SWEEP_HEAD = "| hook: setting | blocks skipped | attentions skipped | mean PSNR | worst clip | within budget |"


def sweep_table(results: dict) -> str:
    lines = [SWEEP_HEAD, "|" + "---|" * (SWEEP_HEAD.count("|") - 1)]
    for hook, trials in results["hook_sweeps"].items():
        for t in trials:
            knob = next(k for k in t if k not in ("blocks_skipped", "attentions_skipped", "psnr_mean", "psnr_worst", "psnr_p5", "within_budget"))
            lines.append(f"| {hook}: {knob} {t[knob]:g} | {100 * t['blocks_skipped']:.1f} % | {100 * t['attentions_skipped']:.1f} % "
                         f"| {t['psnr_mean']:.2f} | {t['psnr_worst']:.2f} | {'yes' if t['within_budget'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    results = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "bench/results/cache.json").read_text())
    tables = (hooks_table, sweep_table) if "hook_sweeps" in results else (table, equal_savings_table)
    print("\n\n".join(f(results) for f in tables))
