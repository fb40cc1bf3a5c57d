"""`vdopt profile BUNDLE`: where a generation's time goes, per step, cache decision, step part and module.

The bundle is warmed up, run timed as it is normally loaded (the step time users get), then run
loaded for profiling under `torch.profiler`. The profiled run's time is attributed:
- per step (`vdopt/step i` ranges) and per cache decision (every row recomputes its body, every
  row reuses it, or mixed), read from the state's body-evaluation counters;
- per part of a split step (`vdopt/part head|compute|reuse|tail`);
- per module path: a torch bundle runs with a profiler range around each run of one module's ops;
  an AOTInductor bundle's kernels are matched, in order, to the call sites of its generated wrapper
  (`.modules.json`, written at lowering); ONNX Runtime profiles its own nodes, named after their
  modules at lowering. The path '' is the step module's own code (guidance, sampler, cache predicate).
A module's time is its self time (nested module ranges are subtracted), so module times add up to
the time spent inside modules; the rest of a step is runtime overhead between kernels.

Writes profile.json, a Chrome trace (trace.json: chrome://tracing, Perfetto) and profile.png.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vdopt.bundle import bundle_file
from vdopt.errors import BundleError, RunInputError
from vdopt.lower.aoti import MODULE_MAP_SUFFIX
from vdopt.lower.onnx_backend import module_of_node
from vdopt.lower.torch_backend import MODULE_RANGE
from vdopt.runtime.session import Session
from vdopt.runtime.trace import CacheTrace

STEP_RANGE = "vdopt/step "
PART_RANGE = "vdopt/part "
DECISIONS = ("uncached", "recompute", "mixed", "reuse")
CONTROL_FLOW = ("If", "Loop", "Scan")


def duration_us(event) -> float:
    return event.time_range.end - event.time_range.start


def ordered(events) -> list:
    return sorted(events, key=lambda e: e.time_range.start)


class KernelCursor:
    """Names AOTInductor kernel events by the wrapper call site they ran from.

    Call sites are in source order and a run executes a subsequence of them (a `torch.cond` branch
    not taken is skipped), so each kernel event takes the next call site with its name."""

    def __init__(self, sites: list[dict[str, str]]):
        self.sites = sites
        self.kernels = {site["kernel"] for site in sites}
        self.position = 0
        self.named: dict[str, str | None] = {}  # event name -> kernel, found once per name

    def reset(self) -> None:
        self.position = 0

    def kernel_of(self, event_name: str) -> str | None:
        if event_name not in self.named:
            # a compiled kernel records itself as `<graph>_<kernel>` (graph_0_cpp_fused_gelu_11)
            self.named[event_name] = event_name if event_name in self.kernels else next(
                (k for k in self.kernels if event_name.endswith("_" + k)), None)
        return self.named[event_name]

    def __call__(self, event) -> str | None:
        kernel = self.kernel_of(event.name)
        if kernel is None:
            return None
        n = len(self.sites)
        for offset in range(n):
            index = (self.position + offset) % n
            if self.sites[index]["kernel"] == kernel:
                self.position = index + 1
                return self.sites[index]["module"]
        return None


def torch_module_namer(event) -> str | None:
    return event.name[len(MODULE_RANGE):] if event.name.startswith(MODULE_RANGE) else None


def module_self_times(event, namer: Callable, totals: dict[str, float]) -> float:
    """Microseconds of `event`'s subtree spent inside module-named events; adds each one's self time
    (its duration less the named events inside it) to `totals`. `namer` sees events in start order."""
    path = namer(event)
    inner = sum(module_self_times(child, namer, totals) for child in ordered(event.cpu_children))
    if path is None:
        return inner
    totals[path] += max(duration_us(event) - inner, 0.0)
    return duration_us(event)


@dataclass
class StepRecord:
    index: int
    ms: float               # under the profiler
    unprofiled_ms: float    # the same step of the same generation, run without a profiler
    decision: str
    rows_computed: int | None
    module_ms: dict[str, float] = field(default_factory=dict)
    part_ms: dict[str, float] = field(default_factory=dict)

    @property
    def attributed_ms(self) -> float:
        return sum(self.module_ms.values())


def decisions(trace: CacheTrace, num_steps: int) -> list[tuple[str, int | None]]:
    if not trace.steps:
        return [("uncached", None)] * num_steps
    out = []
    for step in trace.steps:
        computed = sum(step["computed"])
        rows = len(step["computed"])
        out.append(("recompute" if computed == rows else "reuse" if computed == 0 else "mixed", computed))
    return out


def has_kernel_records(session: Session) -> bool:
    """Whether the bundle's AOTInductor kernels were compiled with profiler records (`lower.kernel_profile`; bundles
    made before the option always were)."""
    recipe = session.manifest.get("recipe")
    lower = recipe.get("lower") if isinstance(recipe, dict) else None
    return (lower.get("kernel_profile", True) if isinstance(lower, dict) else True) is not False


def module_map_of(session: Session) -> list[dict[str, str]] | None:
    """The AOTInductor call-site map of the bundle's (first) segment, if it has one and its kernels are recorded."""
    files = [f for s in session.manifest["segments"] for f in s.get("files", []) if f.endswith(MODULE_MAP_SUFFIX)]
    if not files or not has_kernel_records(session):
        return None
    return parse_module_map(bundle_file(session.path, files[0], session.manifest).read_text(), files[0])


def parse_module_map(text: str, name: str) -> list[dict[str, str]]:
    """A call-site map is data from the bundle: a list of {"kernel": str, "module": str}, nothing else."""
    try:
        sites = json.loads(text)
    except ValueError:
        sites = None
    if not isinstance(sites, list) or not all(isinstance(s, dict) and isinstance(s.get("kernel"), str)
                                              and isinstance(s.get("module"), str) for s in sites):
        raise BundleError(f"{name}: not a kernel call-site map (a JSON list of {{kernel, module}} strings); the bundle "
                          f"was edited or damaged. Recompile it.")
    return sites


def ort_step_modules(report: list[dict], steps: int) -> list[dict[str, float]]:
    """Per-step module self times (ms) from ONNX Runtime's profile: its last `steps` runs, node by node."""
    runs = [e for e in report if e.get("cat") == "Session" and e.get("name") == "model_run"][-steps:]
    # a control-flow node's time holds its branch's nodes, which ORT reports too
    nodes = [e for e in report if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
             and e.get("args", {}).get("op_name") not in CONTROL_FLOW]
    out = []
    for run in runs:
        start, end = run["ts"], run["ts"] + run["dur"]
        totals: dict[str, float] = defaultdict(float)
        for node in nodes:
            if start <= node["ts"] <= end:
                totals[module_of_node(node["name"].removesuffix("_kernel_time"))] += node["dur"] / 1000
        out.append(dict(totals))
    return out


@dataclass
class Profile:
    bundle: str
    backend: str
    device: str
    threads: int
    batch: int
    steps: list[StepRecord]
    attribution: str

    def by_decision(self) -> dict[str, dict[str, float]]:
        groups: dict[str, list[StepRecord]] = defaultdict(list)
        for step in self.steps:
            groups[step.decision].append(step)
        return {d: {"steps": len(g), "ms_per_step_mean": statistics.mean(s.ms for s in g),
                    "ms_per_step_max": max(s.ms for s in g),
                    "unprofiled_ms_per_step_mean": statistics.mean(s.unprofiled_ms for s in g),
                    "unprofiled_ms_per_step_max": max(s.unprofiled_ms for s in g),
                    "attributed_ms_per_step_mean": statistics.mean(s.attributed_ms for s in g)}
                for d, g in sorted(groups.items(), key=lambda kv: DECISIONS.index(kv[0]))}

    def module_ms_per_step(self, depth: int | None = None, per_block: bool = False) -> dict[str, float]:
        """Mean self time per step by module path; `depth` cuts paths to their first `depth` names; without
        `per_block`, list indices become `*`, so the same module of every block adds up into one row."""
        totals: dict[str, float] = defaultdict(float)
        for step in self.steps:
            for path, ms in step.module_ms.items():
                names = path.split(".")[:depth] if depth else path.split(".")
                key = ".".join(n if per_block or not n.isdigit() else "*" for n in names) if path else path
                totals[key] += ms / len(self.steps)
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    def part_ms_per_step(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for step in self.steps:
            for part, ms in step.part_ms.items():
                totals[part] += ms / len(self.steps)
        return dict(totals)

    @property
    def unprofiled_ms_per_step(self) -> float:
        return statistics.mean(s.unprofiled_ms for s in self.steps)

    @property
    def profiled_ms_per_step(self) -> float:
        return statistics.mean(s.ms for s in self.steps)

    @property
    def attributed_fraction(self) -> float:
        return sum(s.attributed_ms for s in self.steps) / sum(s.ms for s in self.steps)

    def to_json(self, depth: int | None = None) -> dict:
        return {"bundle": self.bundle, "backend": self.backend, "device": self.device, "threads": self.threads,
                "batch": self.batch, "torch": torch.__version__, "attribution": self.attribution,
                "unprofiled_ms_per_step": round(self.unprofiled_ms_per_step, 4),
                "profiled_ms_per_step": round(self.profiled_ms_per_step, 4),
                "attributed_fraction": round(self.attributed_fraction, 4),
                "attributed_fraction_of_unprofiled": round(sum(s.attributed_ms for s in self.steps)
                                                           / sum(s.unprofiled_ms for s in self.steps), 4),
                "by_decision": self.by_decision(), "parts_ms_per_step": self.part_ms_per_step(),
                "modules_ms_per_step": {k: round(v, 4) for k, v in self.module_ms_per_step(depth, per_block=True).items()},
                "module_kinds_ms_per_step": {k: round(v, 4) for k, v in self.module_ms_per_step(depth).items()},
                "steps": [{"step": s.index, "ms": round(s.ms, 4), "unprofiled_ms": round(s.unprofiled_ms, 4),
                           "decision": s.decision, "rows_computed": s.rows_computed,
                           "attributed_ms": round(s.attributed_ms, 4), "parts_ms": s.part_ms} for s in self.steps]}

    def table(self, depth: int | None, top: int, per_block: bool = False) -> str:
        shown = self.module_ms_per_step(depth, per_block)
        step_ms = self.profiled_ms_per_step
        lines = [f"profile of {self.bundle} ({self.backend}, {self.device}, {self.threads} thread(s), batch {self.batch}): "
                 f"{len(self.steps)} steps",
                 f"  step time: {self.unprofiled_ms_per_step:.2f} ms without the profiler, {step_ms:.2f} ms profiled "
                 f"({100 * (step_ms / self.unprofiled_ms_per_step - 1):+.0f}%)"]
        for decision, d in self.by_decision().items():
            lines.append(f"  {decision:<10} {d['steps']:>3} steps  {d['unprofiled_ms_per_step_mean']:8.2f} ms/step "
                         f"(worst {d['unprofiled_ms_per_step_max']:.2f}); profiled {d['ms_per_step_mean']:.2f}, "
                         f"in modules {d['attributed_ms_per_step_mean']:.2f}")
        for part, ms in self.part_ms_per_step().items():
            lines.append(f"  part {part:<8} {ms:8.2f} ms/step")
        width = max([len(p or "(step program)") for p in list(shown)[:top]] + [24])
        lines.append(f"\n  {'module' + (f' (depth {depth})' if depth else ''):<{width}} {'ms/step':>9} {'% of step':>9}")
        for path, ms in list(shown.items())[:top]:
            lines.append(f"  {path or '(step program)':<{width}} {ms:9.3f} {100 * ms / step_ms:8.1f}%")
        rest = list(shown.values())[top:]
        if rest:
            lines.append(f"  {f'({len(rest)} more)':<{width}} {sum(rest):9.3f} {100 * sum(rest) / step_ms:8.1f}%")
        attributed = sum(shown.values())
        lines.append(f"  {'sum over modules':<{width}} {attributed:9.3f} {100 * attributed / step_ms:8.1f}%  "
                     f"({100 * attributed / self.unprofiled_ms_per_step:.0f}% of the step without the profiler; "
                     f"attribution: {self.attribution})")
        return "\n".join(lines)

    def plot(self, path: Path, depth: int | None, top: int = 12, per_block: bool = False) -> bool:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        colours = {"uncached": "tab:gray", "recompute": "tab:red", "mixed": "tab:orange", "reuse": "tab:green"}
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
        for decision in DECISIONS:
            steps = [s for s in self.steps if s.decision == decision]
            if steps:
                left.bar([s.index for s in steps], [s.ms for s in steps], color=colours[decision], label=decision)
        left.set_xlabel("step")
        left.set_ylabel("ms (profiled)")
        left.set_title("time per step, by cache decision")
        left.legend(fontsize=8)
        shown = list(self.module_ms_per_step(depth, per_block).items())[:top][::-1]
        root = "denoiser.model." if all(p.startswith("denoiser.model.") for p, _ in shown if p) else ""
        right.barh([p.removeprefix(root) or "(step program)" for p, _ in shown], [ms for _, ms in shown], color="tab:blue")
        right.set_xlabel("ms per step (self time)")
        right.set_title(f"top modules{f' (under {root[:-1]})' if root else ''}")
        right.tick_params(axis="y", labelsize=7)
        fig.suptitle(f"{Path(self.bundle).name}: {self.backend} on {self.device}, {self.profiled_ms_per_step:.1f} ms/step profiled, "
                     f"{100 * self.attributed_fraction:.0f}% in modules\n(attribution: {self.attribution})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True


def generate(session: Session, cond, uncond, seed: int, trace: CacheTrace | None = None) -> None:
    session.run(cond, uncond, seed=seed, progress=False, on_step=trace.on_step if trace else None)


def timed_steps(session: Session, cond, uncond, seed: int) -> list[float]:
    """Each step's wall-clock ms in a run of `session` (on CUDA, synchronised after every step)."""
    marks = []

    def on_step(i, state):
        if session.device.startswith("cuda"):
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    if session.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    session.run(cond, uncond, seed=seed, progress=False, on_step=on_step)
    return [(b - a) * 1000 for a, b in zip([start, *marks], marks)]


def profile_bundle(session: Session, cond: dict, uncond: dict | None, *, seed: int = 0,
                   chrome_trace: Path | None = None, log: Callable[[str], None] = lambda m: None) -> Profile:
    """`session` was opened with profile=True."""
    if session.stages:
        raise RunInputError(f"vdopt profile attributes the steps of one loop; {session.path} runs in stages "
                            f"({' -> '.join(s['name'] for s in session.stages)}), which it does not attribute yet. Time "
                            f"a staged bundle with bench/cmd.py, or profile a one-stage bundle of the same recipe.")
    device = session.device
    backend = session.manifest["segments"][0]["backend"]
    batch = session.batch_of(cond)
    # Timed on runners loaded as usual: a profiling runner carries its own cost even with no profiler
    # listening (module ranges in a torch program; ONNX Runtime profiles from the session's start).
    plain = Session(session.path, device=device, verify=False)  # `session` verified the files
    log("warm-up runs")
    generate(plain, cond, uncond, seed)
    generate(session, cond, uncond, seed)
    log("timed run (no profiler)")
    unprofiled_steps = timed_steps(plain, cond, uncond, seed)
    log("profiled run")
    trace = CacheTrace(session.manifest)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.profiler.profile(activities=activities) as prof:
        generate(session, cond, uncond, seed, trace)
    if chrome_trace is not None:
        prof.export_chrome_trace(str(chrome_trace))

    events = prof.events()
    step_events = ordered(e for e in events if e.name.startswith(STEP_RANGE))
    if len(step_events) != session.num_steps:
        raise RunInputError(f"the profile holds {len(step_events)} step ranges for {session.num_steps} steps; "
                            f"this torch ({torch.__version__}) did not record the vdopt ranges.")
    module_map = module_map_of(session)
    ort_reports = session.backend_profiles()
    if backend == "torch":
        namer, attribution = torch_module_namer, "module ranges in the torch program"
    elif module_map is not None:
        namer, attribution = KernelCursor(module_map), "AOTInductor kernels matched to wrapper call sites"
    elif ort_reports:
        namer, attribution = (lambda event: None), "ONNX Runtime's per-node profile"
    elif backend == "aoti" and not has_kernel_records(session):
        namer, attribution = (lambda event: None), ("none (AOTInductor bundle compiled without kernel records: recompile "
                                                     "it with `vdopt compile --kernel-profile` or lower.kernel_profile: true)")
    else:
        namer, attribution = (lambda event: None), f"none ({backend} bundle without a module map: recompile it)"
    ort_modules = ort_step_modules(ort_reports[0], session.num_steps) if ort_reports else None

    steps = []
    for k, (event, (decision, rows)) in enumerate(zip(step_events, decisions(trace, session.num_steps))):
        totals: dict[str, float] = defaultdict(float)
        if hasattr(namer, "reset"):
            namer.reset()
        module_self_times(event, namer, totals)
        module_ms = {p: us / 1000 for p, us in totals.items()} if ort_modules is None else ort_modules[k]
        parts = {e.name[len(PART_RANGE):]: duration_us(e) / 1000 for e in event.cpu_children if e.name.startswith(PART_RANGE)}
        steps.append(StepRecord(k, duration_us(event) / 1000, unprofiled_steps[k], decision, rows, module_ms, parts))
    return Profile(str(session.path), backend, device, torch.get_num_threads(), batch, steps, attribution)


def nsys_stats(argv: list[str], out_dir: Path) -> dict[str, list[dict[str, str]]]:
    """Re-runs `vdopt profile argv` under Nsight Systems (CUDA and NVTX traces) and returns `nsys stats`'
    NVTX-range and GPU-kernel summaries, one list of CSV rows per report."""
    import csv
    import io
    import shutil
    import subprocess
    import sys

    from vdopt.errors import VdoptError

    nsys = shutil.which("nsys")
    if nsys is None:
        raise VdoptError("--nsys needs Nsight Systems' `nsys` on PATH, which this machine lacks; run without --nsys "
                         "for the torch.profiler table, or install Nsight Systems (a GPU machine usually has it).")
    report = out_dir / "nsys"
    subprocess.run([nsys, "profile", "-t", "cuda,nvtx", "--force-overwrite", "true", "-o", str(report),
                    sys.executable, "-m", "vdopt.cli", "profile", *argv], check=True)
    summaries = {}
    for name in ("nvtx_sum", "cuda_gpu_kern_sum"):
        base = out_dir / f"nsys_{name}"
        subprocess.run([nsys, "stats", "--report", name, "--format", "csv", "--force-export", "true",
                        "--output", str(base), f"{report}.nsys-rep"], check=True)
        found = sorted(out_dir.glob(f"nsys_{name}*.csv"))
        summaries[name] = list(csv.DictReader(io.StringIO(found[0].read_text()))) if found else []
    return summaries


def nsys_table(summaries: dict[str, list[dict[str, str]]], top: int) -> str:
    lines = []
    for name, rows in summaries.items():
        lines.append(f"\n  nsys {name}: {len(rows)} rows")
        for row in rows[:top]:
            label = row.get("Range") or row.get("Name") or "?"
            lines.append(f"    {row.get('Time (%)', '?'):>6}%  {row.get('Total Time (ns)', '?'):>14} ns  {label[:100]}")
    return "\n".join(lines)
