"""The README's profiling tables, printed as Markdown from `vdopt profile` results files: per bundle and
cache decision, the step time without the profiler and how much of it the module times account for;
then the top modules of the first file.

    python bench/profile_table.py bench/results/profile_teacher.json [bench/results/profile_cached.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DECISION_HEAD = ("| bundle | decision | steps | ms / step without profiler | worst step | ms / step profiled "
                 "| sum over modules, ms | modules / step without profiler |")
MODULE_HEAD = "| module (every block's alike summed) | ms / step | % of profiled step |"


def bundle_label(profile: dict) -> str:
    return f"{Path(profile['bundle']).name} ({profile['backend']})"


def decision_table(profiles: list[dict]) -> str:
    lines = [DECISION_HEAD, "|" + "---|" * (DECISION_HEAD.count("|") - 1)]
    for p in profiles:
        for decision, d in p["by_decision"].items():
            lines.append(f"| {bundle_label(p)} | {decision} | {d['steps']} | {d['unprofiled_ms_per_step_mean']:.2f} "
                         f"| {d['unprofiled_ms_per_step_max']:.2f} | {d['ms_per_step_mean']:.2f} | {d['attributed_ms_per_step_mean']:.2f} "
                         f"| {100 * d['attributed_ms_per_step_mean'] / d['unprofiled_ms_per_step_mean']:.1f} % |")
    return "\n".join(lines)


def module_table(profile: dict, top: int = 10) -> str:
    lines = [MODULE_HEAD, "|" + "---|" * (MODULE_HEAD.count("|") - 1)]
    modules = list(profile["module_kinds_ms_per_step"].items())
    step = profile["profiled_ms_per_step"]
    for path, ms in modules[:top]:
        lines.append(f"| `{path or '(step program)'}` | {ms:.3f} | {100 * ms / step:.1f} % |")
    rest = sum(ms for _, ms in modules[top:])
    lines.append(f"| ({len(modules) - top} more) | {rest:.3f} | {100 * rest / step:.1f} % |")
    return "\n".join(lines)


if __name__ == "__main__":
    profiles = [json.loads(Path(path).read_text()) for path in sys.argv[1:]]
    print(decision_table(profiles) + "\n\n" + module_table(profiles[0]))
