"""Every figure in the README comes from a results file (issue 14, "What it must show" 5).

Cheap: reads README.md and the JSON files in bench/results/, runs nothing. It fails when
  * the README names a `bench/results/*.json` file that does not exist or is not valid JSON;
  * a table of figures (cells with ×, %, dB or a decimal number) is neither registered below with
    the results file and keys that back it nor listed in NOT_BACKED with the reason;
  * a registered table cites no results file in its section, cites another one, or a figure in it
    differs from the results file by more than one unit of its last printed digit;
  * a registered table has a column of figures the registry does not map to a key, or a row the
    results file does not have.
When a bench is re-run, update the README table from its JSON (or the mapping here, if the table's
columns change); when a NOT_BACKED table gets a results file, move it to TABLES.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from cache_table import LEVELS, psnr_at  # noqa: E402
from profile_table import bundle_label  # noqa: E402
from cache_table import ROWS as CACHE_ROWS  # noqa: E402 - the README row -> bench/cache.py row map, one copy
README = ROOT / "README.md"
RESULTS_PATH = re.compile(r"bench/results/[\w.-]+\.json")
FIGURE = re.compile(r"\d×|\d\s?%|\d\s?dB|\d\.\d")
NUMBER = re.compile(r"\d+(?:\.\d+)?")


# ----- reading the README ---------------------------------------------------------------------

@dataclass
class Table:
    section: str  # the nearest heading above the table
    section_text: str  # that section, heading to next heading
    header: list[str]
    rows: list[list[str]]
    line: int


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def sections(text: str) -> list[tuple[str, int, list[str]]]:
    """(heading, first line number, lines) for every heading of any level (text before the first: '')."""
    out, heading, start, lines, fenced = [], "", 1, [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#+ ", line):
            out.append((heading, start, lines))
            heading, start, lines = line.lstrip("#").strip(), n, []
        lines.append(line)
    out.append((heading, start, lines))
    return out


def tables(text: str) -> list[Table]:
    found = []
    for heading, start, lines in sections(text):
        section_text = "\n".join(lines)
        block: list[tuple[int, str]] = []
        for n, line in enumerate(lines + [""], start):
            if line.lstrip().startswith("|"):
                block.append((n, line))
                continue
            if len(block) >= 3:
                found.append(Table(heading, section_text, cells(block[0][1]), [cells(b) for _, b in block[2:]], block[0][0]))
            block = []
    return found


def numbers(cell: str) -> list[float]:
    return [float(x) for x in NUMBER.findall(cell)]


def close(shown: str, value: float) -> bool:
    """`shown` is `value` printed with some digits: allow one unit of the last digit (rounding or truncation)."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown) - value) <= 10.0 ** -decimals + 1e-9


def load(path: str):
    return json.loads((ROOT / path).read_text())


# ----- what backs each table of figures ---------------------------------------------------------

Getter = Callable[[dict], list[float]]


@dataclass
class Spec:
    """A README table of figures and the results file behind it.

    `header`: words the table's first header cell and the header as a whole contain (identifies it).
    `rows(data, cells)`: the results-file record of a README row (None: the row is not in the file).
    `columns`: header cell -> the numbers that cell shows, from the record, in order.
    """

    name: str
    header: tuple[str, ...]
    file: str
    rows: Callable[[dict, list[str]], dict | None]
    columns: dict[str, Getter]
    unbacked_rows: dict[str, str] = field(default_factory=dict)  # row label prefix -> why
    unordered: frozenset[str] = frozenset()  # columns whose numbers are compared as sorted lists
    also: tuple[str, ...] = ()  # more results files behind other rows: `rows` then gets {path: data} of all

    @property
    def files(self) -> tuple[str, ...]:
        return (self.file, *self.also)

    def data(self) -> dict:
        return {f: load(f) for f in self.files} if self.also else load(self.file)


def backends_row(data: dict, row: list[str]) -> dict | None:
    config = next((c for c in data["configs"] if c["config"] == row[0].strip("`* ")), None)
    return {r["backend"]: r for r in config["rows"]}.get(row[1].strip("`* ")) if config else None


def steps_row(data: dict, row: list[str]) -> dict | None:
    for config in data["configs"]:
        if config["backend"] == row[0].strip("`* ") and str(config["batch"]) == row[1].strip("`* "):
            return config
    return None


def cache_row(data: dict, row: list[str]) -> dict | None:
    key = CACHE_ROWS.get(row[0].strip("* "))
    return data["rows"].get(key) if key else None


def cache_params(record: dict) -> list[float]:
    """The calibrated parameters the README shows: numbers only (not the policy, codebook or moreg flag),
    without max_reuse -1 (unlimited); none for the uncached run and the floor."""
    params = record["params"]
    if params is None or record["body_evals_saved"] == 1.0:
        return []
    return [float(v) for k, v in params.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (k == "max_reuse" and v == -1)]


CACHE_HOOKS = "bench/results/cache_hooks.json"
PROFILE_TEACHER = "bench/results/profile_teacher.json"
PROFILE_CACHED = "bench/results/profile_cached.json"


def profile_decision_row(data: dict, cells: list[str]) -> dict | None:
    """A (bundle, decision) row of the profiling table, from whichever profile file is that bundle's."""
    for profile in data.values():
        if bundle_label(profile) == cells[0] and cells[1] in profile["by_decision"]:
            return profile["by_decision"][cells[1]]
    return None


def profile_module_row(data: dict, cells: list[str]) -> dict | None:
    """A module row of the teacher's profile: its time per step and share of the profiled step; the
    '(N more)' row sums the N modules after the listed ones."""
    modules, step = data["module_kinds_ms_per_step"], data["profiled_ms_per_step"]
    label = cells[0].strip("` ")
    more = re.fullmatch(r"\((\d+) more\)", label)
    if more:
        ms = sum(list(modules.values())[len(modules) - int(more.group(1)):])
    else:
        path = "" if label == "(step program)" else label
        if path not in modules:
            return None
        ms = modules[path]
    return {"ms": ms, "share": 100 * ms / step}


def hooks_row(data: dict, cells: list[str]) -> dict | None:
    return data["rows"].get(cells[0].strip("* "))


def sweep_row(data: dict, cells: list[str]) -> dict | None:
    """A hook-sweep row, 'hook: knob value': the hook's trial at that knob value."""
    hook, _, setting = cells[0].partition(": ")
    shown = NUMBER.findall(setting)  # printed with :g, so exact
    return next((t for t in data["hook_sweeps"].get(hook, []) if shown and float(shown[-1]) == float(t[next(iter(t))])), None)


def psnr_at_level(level: float) -> Getter:
    """Mean and worst-clip PSNR of a policy's calibration trials at `level` body evaluations saved."""
    def get(record: dict) -> list[float]:
        trials = record["calibration"]["trials"]
        mean = psnr_at(trials, level)
        return [] if mean is None else [mean, psnr_at(trials, level, "psnr_worst")]

    return get


def pct(*keys: str) -> Getter:
    def get(record: dict) -> list[float]:
        out = []
        for key in keys:
            value = record
            for part in key.split("."):
                value = value[part]
            out.append(100 * value)
        return out

    return get


EVAL_TEACHER = "bench/results/eval_teacher.json"
EVAL_NAIVE = "bench/results/eval_naive4.json"
EVAL_STUDENT = "bench/results/eval_student.json"
EVAL_STUDENT_SEED1 = "bench/results/eval_student_seed1.json"
STEPS_QUIET = "bench/results/steps_quiet_aoti_batch1.json"


def eval_row(files: dict[str, str]) -> Callable[[dict, list[str]], dict | None]:
    """Rows of an eval table: the label (before any markup) names the `vdopt eval` results file."""
    def row(data: dict, cells: list[str]) -> dict | None:
        path = files.get(cells[0].strip("* "))
        return {**data[path], "file": path} if path else None

    return row


def psnr_vs_reference(record: dict) -> list[float]:
    """The mean PSNR against the reference run; none for the reference itself (shown as ∞)."""
    return [record["all"]["vs_reference"]["psnr_db"]] if "vs_reference" in record["all"] else []


def wall_clock(record: dict) -> list[float]:
    """The step-reduction table's wall-clock column: 1× for the teacher, the quiet aoti batch-1 run's
    speedup for the shipped student (bench/results/steps_quiet_aoti_batch1.json), blank for the naive run."""
    return {EVAL_TEACHER: [1.0], EVAL_STUDENT: [load(STEPS_QUIET)["speedup"]]}.get(record["file"], [])


def forecast_row(data: dict, cells: list[str]) -> dict | None:
    """A forecast-sweep row: 'policy, name value, ...' must be the policy and fixed params of its file."""
    policy, *fixed = [part.strip() for part in cells[0].split(",")]
    try:
        shown = {name: float(value) for name, value in (part.split(" ", 1) for part in fixed)}
    except ValueError:
        return None
    for record in data.values():
        params = {k: float(v) for k, v in record["params"].items()
                  if k not in ("policy", record["knob"]) and not (k == "max_reuse" and v == -1)}
        if record["policy"] == policy and shown == params:
            return record
    return None


def forecast_psnr(weight: float) -> Getter:
    def get_psnr(record: dict) -> list[float]:
        return [t["psnr_mean"] for t in record["trials"] if t[record["knob"]] == weight]

    return get_psnr


def prune_block_row(data: dict, cells: list[str]) -> dict | None:
    """A `vdopt prune` table row: the unpruned program, or a block named by the last two parts of its path."""
    name, unpruned = cells[0].strip("`* "), data["unpruned"]
    if name == "(unpruned)":
        return {"unpruned": True, **unpruned}
    row = next((r for r in data["latency_and_sensitivity"] if r["block"].endswith(f".{name}")), None)
    return {**row, "share": 100 * row["cost_ms"] / unpruned["ms_per_step"]} if row else None


def unless_unpruned(get: Getter) -> Getter:
    return lambda r: [] if r.get("unpruned") else get(r)


EVAL_COLUMNS = {
    "shape": pct("all.accuracy.shape"),
    "colour": pct("all.accuracy.colour"),
    "direction": pct("all.accuracy.direction"),
}

EVAL_COLUMNS_FLAT = {"shape": pct("accuracy.shape"), "colour": pct("accuracy.colour"), "direction": pct("accuracy.direction")}

E2E_COLUMNS = {  # bench/e2e.py's rows
    "clips / s": lambda r: [r["clips_per_second"]],
    "× eager: median": lambda r: [r.get("speedup_median", 1.0)],
    "worst round": lambda r: [r["speedup_worst_round"]] if "speedup_worst_round" in r else [],
    "shape": pct("accuracy.shape"),
    "direction": pct("accuracy.direction"),
    "FVD-MS": lambda r: [r["fvd_ms"]],
}

def cmd_row(data: dict, cells: list[str]) -> dict | None:
    """bench/cmd.py's row for a label like 'cmd, 4 clips / generation': the program's quality and its timing at that batch."""
    name, _, batch = cells[0].strip("`* ").partition(", ")
    row = data["rows"].get(name)
    timing = row and row["by_batch"].get(batch.split(" ")[0])
    return None if timing is None else {**row, **timing}


SPECS = [
    Spec("backend clip time", ("config", "clip s"), "bench/results/backends.json", backends_row, {
        "clip s: median": lambda r: [r["clip_s_median"]],
        "mean": lambda r: [r["clip_s_mean"]],
        "worst": lambda r: [r["clip_s_worst"]],
        "speedup vs eager diffusers loop: median": lambda r: [r["speedup_vs_eager"]],
        "mean of rounds": lambda r: [r["speedup_vs_eager_mean"]],
        "worst round": lambda r: [r["speedup_vs_eager_worst_round"]],
    }),
    Spec("roofline", ("config", "GFLOP / step"), "bench/results/roofline.json",
         lambda data, cells: next((c for c in data["configs"] if c["config"] == cells[0]), None), {
             "GFLOP / step": lambda c: [c["flops_per_step"] / 1e9],
             "eager ms / step: median": lambda c: [c["eager_ms_per_step_median"]],
             "worst": lambda c: [c["eager_ms_per_step_worst"]],
             "eager GFLOP/s": lambda c: [c["eager_gflops"]],
             "speedup ceiling, fp32": lambda c: [c["ceiling_fp32"]],
             "bf16": lambda c: [c["ceiling_bf16"]],
             "target": lambda c: [c["target"]],
         }),
    Spec("step reduction wall clock", ("backend", "clips per call"), "bench/results/steps.json", steps_row, {
        "teacher s / clip": lambda c: [c["rows"]["teacher"]["seconds_median"]],
        "student s / clip": lambda c: [c["rows"]["student"]["seconds_median"]],
        "speedup: median": lambda c: [c["speedup"]],
        "mean of rounds": lambda c: [c["speedup_per_round_mean"]],
        "worst round": lambda c: [c["speedup_worst_round"]],
    }),
    Spec("caching policies", ("policy", "body evaluations saved"), "bench/results/cache.json", cache_row, {
        "params": cache_params,
        "body evaluations saved": pct("body_evals_saved"),
        "steps with no body": pct("steps_without_body"),
        "wall-clock speedup": lambda r: [r["speedup"]] + ([r["seconds_median"]] if r["params"] is None else []),
        "PSNR vs uncached": lambda r: [r["psnr_db"]] if "psnr_db" in r else [],
        "worst clip": lambda r: [r["psnr_db_worst"]] if "psnr_db_worst" in r else [],
        "SSIM": lambda r: [r.get("ssim", 1.0)],
        "accuracy shape / colour / direction": pct("accuracy.shape", "accuracy.colour", "accuracy.direction"),
        "FVD-MS vs real (floor 1.5)": lambda r: [r["fvd_ms_vs_real"]],
    }, unordered=frozenset({"params"})),
    Spec("caching at equal savings", ("policy", "decides from"), "bench/results/cache.json", cache_row,
         {f"{100 * level:.0f} % saved": psnr_at_level(level) for level in LEVELS}),
    Spec("cache vs diffusers hooks", ("row", "work skipped"), CACHE_HOOKS, hooks_row, {
        "setting": lambda r: [float(v) for v in (r["setting"] or {}).values()],
        "work skipped": lambda r: [100 * v for v in r["work"].values()],
        "clip s: median": lambda r: [r["seconds_median"]],
        "worst round": lambda r: [r["seconds_worst"]],
        "speedup vs eager loop": lambda r: [r["speedup_vs_eager"]],
        "PSNR vs uncached": lambda r: [r["psnr_db"]] if "psnr_db" in r else [],
        "worst clip": lambda r: [r["psnr_db_worst"]] if "psnr_db_worst" in r else [],
        "accuracy shape / colour / direction": pct("accuracy.shape", "accuracy.colour", "accuracy.direction"),
    }),
    Spec("diffusers hook settings", ("hook: setting", "blocks skipped"), CACHE_HOOKS, sweep_row, {
        "blocks skipped": pct("blocks_skipped"),
        "attentions skipped": pct("attentions_skipped"),
        "mean PSNR": lambda t: [t["psnr_mean"]],
        "worst clip": lambda t: [t["psnr_worst"]],
    }),
    Spec("profile by decision", ("bundle", "decision"), PROFILE_TEACHER, profile_decision_row, {
        "steps": lambda d: [d["steps"]],
        "ms / step without profiler": lambda d: [d["unprofiled_ms_per_step_mean"]],
        "worst step": lambda d: [d["unprofiled_ms_per_step_max"]],
        "ms / step profiled": lambda d: [d["ms_per_step_mean"]],
        "sum over modules, ms": lambda d: [d["attributed_ms_per_step_mean"]],
        "modules / step without profiler": lambda d: [100 * d["attributed_ms_per_step_mean"] / d["unprofiled_ms_per_step_mean"]],
    }, also=(PROFILE_CACHED,)),
    Spec("profile by module", ("module (every block's alike summed)", "ms / step"), PROFILE_TEACHER, profile_module_row, {
        "ms / step": lambda r: [r["ms"]],
        "% of profiled step": lambda r: [r["share"]],
    }),
    Spec("reference model", ("sampling", "shape"), EVAL_TEACHER,
         eval_row({"50 steps, g = 3": EVAL_TEACHER, "4 steps, g = 3 (naive)": EVAL_NAIVE}), {
             **EVAL_COLUMNS,
             "FVD-MS vs real (floor)": lambda r: [r["all"]["fvd_ms"], r["all"]["fvd_ms_floor"]],
             "PSNR vs 50 steps": psnr_vs_reference,
         }, also=(EVAL_NAIVE,)),
    Spec("step reduction quality", ("program", "evals / clip"), EVAL_TEACHER,
         eval_row({"teacher, 50 steps, g = 3": EVAL_TEACHER, "teacher, 4 steps (naive)": EVAL_NAIVE,
                   "student, trajectory + adversarial, 4 000 iterations (shipped)": EVAL_STUDENT}), {
             **EVAL_COLUMNS,
             "FVD-MS vs real (floor)": lambda r: [r["all"]["fvd_ms"], r["all"]["fvd_ms_floor"]],
             "PSNR vs teacher": psnr_vs_reference,
             "wall clock (aoti)": wall_clock,
         }, also=(EVAL_NAIVE, EVAL_STUDENT, STEPS_QUIET)),
    Spec("pruning tables", ("block", "cost ms / step"), "bench/results/prune_teacher.json", prune_block_row, {
        "cost ms / step": lambda r: [r["ms_per_step"]] if r.get("unpruned") else [r["cost_ms"]],
        "share of step": unless_unpruned(lambda r: [r["share"]]),
        "PSNR vs unpruned": unless_unpruned(lambda r: [r["psnr_mean"]]),
        "worst clip": unless_unpruned(lambda r: [r["psnr_worst"]]),
        "shape / direction / track direction": lambda r: [r["accuracy"]["shape"], r["accuracy"]["direction"], r["track_direction"]],
    }),
    Spec("pruned student", ("program", "parameters"), "bench/results/prune.json",
         lambda data, cells: data["rows"].get(cells[0].strip("`* ")), {
             "parameters": lambda r: [r["parameters"]],
             "MFLOP / step": lambda r: [r["mflops_per_step"]],
             "ms / step: median": lambda r: [r["ms_per_step_median"]],
             "worst round": lambda r: [r["ms_per_step_worst"]],
             **EVAL_COLUMNS_FLAT,
             "FVD-MS": lambda r: [r["fvd_ms"]],
             "PSNR vs teacher": lambda r: [r["vs_reference"]["psnr_db"]],
         }),
    Spec("custom ops alone", ("op, at the step's shapes", "aten µs"), "bench/results/ops.json",
         lambda data, cells: next((r for r in data["ops"] if r["case"] == cells[0]), None), {
             "aten µs": lambda r: [r["aten_us_median"]],
             "fused µs": lambda r: [r["fused_us_median"]],
             "speedup": lambda r: [r["speedup_of_medians"]],
             "worst pair": lambda r: [r["speedup_worst_call_pair"]],
         }),
    Spec("custom ops in bundles", ("comparison", "step ms before"), "bench/results/ops.json",
         lambda data, cells: next((r for r in data["bundles"] if r["comparison"] == cells[0] and r["backend"] == cells[1]), None), {
             "step ms before": lambda r: [r["baseline_step_ms_median"]],
             "step ms after": lambda r: [r["variant_step_ms_median"]],
             "speedup": lambda r: [r["speedup_of_medians"]],
             "worst round": lambda r: [r["speedup_worst_round"]],
             "max abs diff, 1e-5": lambda r: [r["max_abs_diff"] * 1e5],
         }),
    Spec("C++ runtime", ("bundle", "loop overhead ms / step"), "bench/results/cpp.json",
         lambda data, cells: next((r[{"C++": "cpp", "python": "python"}[cells[1]]] for r in data["rows"]
                                   if r["bundle"] == cells[0] and cells[1] in ("C++", "python")), None), {
             "step ms": lambda r: [r["step_ms_median"]],
             "loop overhead ms / step": lambda r: [r["loop_overhead_ms_per_step_median"]],
             "overhead % of step": lambda r: [r["loop_overhead_percent_of_step_median"]],
             "worst %": lambda r: [r["loop_overhead_percent_of_step_worst"]],
             "setup ms / run": lambda r: [r["setup_ms_per_run_median"]],
         }),
    Spec("end to end", ("program", "clips / s"), "bench/results/e2e.json",
         lambda data, cells: data["rows"].get(cells[0].strip("`* ").removesuffix(" (best)")), E2E_COLUMNS),
    Spec("CMD form", ("program", "s / clip: median"), "bench/results/cmd.json", cmd_row, {
             "s / clip: median": lambda r: [r["seconds_per_clip_median"]],
             "worst round": lambda r: [r["seconds_per_clip_worst"]],
             **EVAL_COLUMNS_FLAT,
             "FVD-MS": lambda r: [r["fvd_ms"]],
         }),
    Spec("CMD FLOPs", ("frames", "teacher GFLOP / clip"), "bench/results/cmd.json",
         lambda data, cells: data["flops_per_clip"].get(cells[0]), {
             "teacher GFLOP / clip": lambda r: [r["teacher"] / 1e9],
             "CMD content": lambda r: [r["cmd_content"] / 1e9],
             "CMD motion": lambda r: [r["cmd_motion"] / 1e9],
             "CMD decode": lambda r: [r["cmd_decode"] / 1e9],
             "CMD total": lambda r: [r["cmd_total"] / 1e9],
         }),
    Spec("CMD end to end", ("CMD program", "clips / s"), "bench/results/e2e_cmd.json",
         lambda data, cells: data["rows"].get(cells[0].strip("`* ")), E2E_COLUMNS),
    Spec("forecast weight", ("forecast weight", "0 (reuse)"), "bench/results/forecast_static.json", forecast_row, {
        "0 (reuse)": forecast_psnr(0), "0.4": forecast_psnr(0.4), "0.5": forecast_psnr(0.5), "0.6": forecast_psnr(0.6),
        "0.75": forecast_psnr(0.75), "1": forecast_psnr(1),
    }, also=("bench/results/forecast_teacache.json",)),
]

# Tables of figures that no results file backs yet, with why. Each is an open debt of issue 14 ("no
# figure without one"), not checked against anything; the test fails when one disappears from the
# README (then drop it here), so the list stays current. Empty: every table of figures is in SPECS.
NOT_BACKED: dict[tuple[str, ...], str] = {}

# Tables with decimals that are settings or model versions, not measurements.
NOT_FIGURES = {("policy", "decision per (sample, branch) row"), ("family", "diffusers class")}


def matches(header: list[str], words: tuple[str, ...]) -> bool:
    return header[0] == words[0] and all(any(w in h for h in header) for w in words[1:])


def figure_tables() -> list[Table]:
    return [t for t in tables(README.read_text()) if any(FIGURE.search(c) for row in t.rows for c in row[1:])
            and not any(matches(t.header, key) for key in NOT_FIGURES)]


# ----- tests --------------------------------------------------------------------------------------

def test_parser_finds_the_tables():
    """The checks below are only as good as the table parser: it must see the known figure tables."""
    found = figure_tables()
    for spec in SPECS:
        assert any(matches(t.header, spec.header) for t in found), f"README has no table like {spec.header}"
    assert len(found) >= len(SPECS)


@pytest.mark.parametrize("path", sorted(set(RESULTS_PATH.findall(README.read_text()))))
def test_cited_results_files_exist_and_parse(path):
    assert (ROOT / path).is_file(), f"README cites {path}, which does not exist"
    data = load(path)
    assert isinstance(data, dict) and data, f"{path} holds no results object"


def test_every_figure_table_is_backed_or_listed():
    unaccounted = [f"README line {t.line} ({t.section}): | {' | '.join(t.header)} |" for t in figure_tables()
                   if not any(matches(t.header, s.header) for s in SPECS)
                   and not any(matches(t.header, key) for key in NOT_BACKED)]
    assert not unaccounted, ("tables of figures with no results file behind them (add the file and a Spec in "
                             "tests/test_readme_figures.py, or list them in NOT_BACKED with the reason):\n" + "\n".join(unaccounted))


def test_not_backed_list_is_current():
    headers = [t.header for t in figure_tables()]
    stale = [key for key in NOT_BACKED if not any(matches(h, key) for h in headers)]
    assert not stale, f"NOT_BACKED lists tables the README no longer has: {stale}"


def check(spec: Spec, table: Table, data: dict) -> list[str]:
    """What in `table` the results file `data` does not back."""
    problems = []
    for column, head in enumerate(table.header):
        has_figures = any(FIGURE.search(row[column]) for row in table.rows if column < len(row))
        if column > 0 and head not in spec.columns and has_figures:
            problems.append(f"column '{head}' holds figures that no results key backs")
    for row in table.rows:
        label = row[0]
        if any(label.strip("* ").startswith(prefix) for prefix in spec.unbacked_rows):
            continue
        record = spec.rows(data, row)
        if record is None:
            problems.append(f"row '{label}' is not in {', '.join(spec.files)}")
            continue
        for column, head in enumerate(table.header):
            if head not in spec.columns or column >= len(row):
                continue
            shown = NUMBER.findall(row[column])
            expected = spec.columns[head](record)
            if head in spec.unordered:
                shown, expected = sorted(shown, key=float), sorted(expected)
            if len(shown) != len(expected) or not all(close(s, v) for s, v in zip(shown, expected)):
                problems.append(f"row '{label}', column '{head}': README shows {row[column]!r}, "
                                f"{', '.join(spec.files)} has {[round(v, 4) for v in expected]}")
    return problems


def table_for(spec: Spec) -> Table:
    return next(t for t in figure_tables() if matches(t.header, spec.header))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_table_figures_match_results_file(spec):
    table = table_for(spec)
    cited = set(RESULTS_PATH.findall(table.section_text))
    for path in spec.files:
        assert path in cited, f"the README section '{table.section}' does not cite {path} (cites {sorted(cited)})"
    problems = check(spec, table, spec.data())
    assert not problems, f"README table '{spec.name}' (line {table.line}) against {', '.join(spec.files)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_a_stale_figure_fails(spec):
    """The check must be able to fail: each figure column, edited away from its results file, is caught."""
    table = table_for(spec)
    data = spec.data()
    for column, head in enumerate(table.header):
        if head not in spec.columns:
            continue
        row = next(r for r in table.rows if spec.rows(data, r) is not None and NUMBER.search(r[column]))
        stale = [list(r) for r in table.rows]
        i = table.rows.index(row)
        stale[i][column] = NUMBER.sub(lambda m: f"{float(m.group()) * 1.3 + 1:.2f}", row[column], count=1)
        problems = check(spec, Table(table.section, table.section_text, table.header, stale, table.line), data)
        assert any(f"column '{head}'" in p for p in problems), (head, stale[i][column])
    missing = Table(table.section, table.section_text, table.header, [["no such row"] + table.rows[0][1:]], table.line)
    assert any("is not in" in p for p in check(spec, missing, data))


def test_student_wall_clock_cell():
    """The shipped student's wall-clock cell in the step-reduction quality table is the quiet aoti, batch-1 run's."""
    table = next(t for t in figure_tables() if matches(t.header, ("program", "evals / clip")))
    column = next(i for i, h in enumerate(table.header) if h.startswith("wall clock"))
    assert "aoti" in table.header[column]
    row = next(r for r in table.rows if "(shipped)" in r[0])
    config = load("bench/results/steps_quiet_aoti_batch1.json")
    shown = NUMBER.findall(row[column])
    assert len(shown) == 1 and close(shown[0], config["speedup"]), (row[column], config["speedup"])


def test_close_is_strict_enough():
    """The tolerance is one unit of the last printed digit, no more: a stale figure fails."""
    assert close("22.2", 22.187) and close("2511", 2511.5)
    assert not close("22.2", 24.2) and not close("1.66", 1.70) and not close("469.7", 279.8)


def test_earlier_quiet_step_runs_are_their_files():
    """The quiet-machine wall-clock figures quoted in the step-reduction text are those of their files."""
    text = README.read_text()
    quiet = load("bench/results/steps_quiet_aoti_batch1.json")
    onnx4 = load("bench/results/steps_onnx_batch4.json")
    assert (quiet["backend"], quiet["batch"], onnx4["backend"], onnx4["batch"]) == ("aoti", 1, "onnx", 4)
    sentence = re.search(r"AOTInductor\s+at ([\d.]+) s against ([\d.]+) s per clip, ([\d.]+)× \((\d+) interleaved rounds, "
                         r"`bench/results/steps_quiet_aoti_batch1.json`\),\s+and ONNX Runtime at 4 clips per call ([\d.]+)× "
                         r"\((\d+) rounds, `bench/results/steps_onnx_batch4.json`\)", text)
    assert sentence, "the step-reduction section no longer quotes the quiet runs as this test expects"
    teacher, student, speedup, rounds, onnx_speedup, onnx_rounds = sentence.groups()
    assert close(teacher, quiet["rows"]["teacher"]["seconds_median"]) and close(student, quiet["rows"]["student"]["seconds_median"])
    assert close(speedup, quiet["speedup"]) and int(rounds) == quiet["rounds"]
    assert close(onnx_speedup, onnx4["speedup"]) and int(onnx_rounds) == onnx4["rounds"]


def test_held_out_accuracy_is_the_teacher_eval():
    """The held-out figures under the reference-model table are the teacher eval's `held_out` split."""
    sentence = re.search(r"Held-out prompts \(attribute triples never trained on\): ([\d.]+) / ([\d.]+) / ([\d.]+) %", README.read_text())
    assert sentence, "the reference-model section no longer quotes the held-out accuracy as this test expects"
    accuracy = load(EVAL_TEACHER)["held_out"]["accuracy"]
    for shown, key in zip(sentence.groups(), ("shape", "colour", "direction")):
        assert close(shown, 100 * accuracy[key]), (key, shown, accuracy[key])


def test_student_fvd_ratios_are_their_files():
    """1.244× (eval seed 0) and 1.215× (seed 1): the student's FVD-MS over the teacher's on the same clips."""
    sentence = re.search(r"its FVD-MS is ([\d.]+)× the\s+teacher's \(the bar is 1.25×; ([\d.]+)× on a second set of 256 clips",
                         README.read_text())
    assert sentence, "the step-reduction section no longer quotes the FVD-MS ratios as this test expects"
    teacher = load(EVAL_TEACHER)["all"]
    for shown, path, seed in zip(sentence.groups(), (EVAL_STUDENT, EVAL_STUDENT_SEED1), (0, 1)):
        data = load(path)
        assert data["seed"] == seed and data["prompts_n"] == 256, path
        student = data["all"]
        assert close(shown, student["fvd_ms"] / student["vs_reference"]["reference_fvd_ms_vs_real"]), (path, shown)
    # the seed-0 reference clips are the teacher eval's: the same FVD-MS either way
    assert abs(load(EVAL_STUDENT)["all"]["vs_reference"]["reference_fvd_ms_vs_real"] - teacher["fvd_ms"]) < 1e-6


def test_forecast_sweep_savings_are_their_files():
    """The forecast paragraph's '72 % / 82 % saved' are the sweeps' body evaluations saved, every weight alike."""
    sentence = re.search(r"6 prompts \(seed (\d+)\), (\d+) % / (\d+) % saved", README.read_text())
    assert sentence, "the forecast paragraph no longer quotes the savings as this test expects"
    for path, shown in zip(("bench/results/forecast_static.json", "bench/results/forecast_teacache.json"), sentence.groups()[1:]):
        data = load(path)
        assert data["seed"] == int(sentence.group(1)) and len(data["prompts"]) == 6, path
        assert {round(100 * t["body_evals_saved"]) for t in data["trials"]} == {int(shown)}, path
