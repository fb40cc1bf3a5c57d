"""Property-based fuzzing of everything a user hands vdopt (issue 15, item 2): recipes, bundle manifests
and command lines, mutated from valid ones by hypothesis.

Properties: every input either works or is refused with a `VdoptError` (exit status 2 and one
`vdopt CMD: error:` paragraph on the command line); never a traceback, never a hang (each case is
bounded by a hypothesis deadline and the whole test by pytest-timeout), never a file written
outside where the user said, and what is accepted really is valid (`recipe_is_valid`).

The runs are reproducible (`derandomize=True`, no example database): the same examples every run
until the test or hypothesis changes; a failure prints the falsifying example and a
`@reproduce_failure` blob. The default tier runs small samples (about 1.5 min on two cores); the `slow`
tier (`pytest -m slow tests/test_fuzz.py`) runs the same properties on about ten times as many cases.
Bugs the fuzzer found are kept as plain regression tests (`test_found_*`) beside each property.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vdopt.bundle import MANIFEST, MANIFEST_CHECKSUM
from vdopt.cli import main
from vdopt.errors import RecipeError
from vdopt.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "vdopt/reference/weights/teacher.safetensors"
VALID = {"model": {"family": "wan", "input": {"frames": 2, "height": 4, "width": 4}}, "sampler": {"steps": 2}}
SHIPPED = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "recipes").glob("*.yaml"))}
DISTILL = {name: data for name, data in SHIPPED.items() if "distill" in data}
COMPILE_BASES = [VALID] + [data for name, data in SHIPPED.items() if name not in DISTILL]
SCALES = [pytest.param(1, marks=pytest.mark.timeout(120), id="ci"),
          pytest.param(10, marks=[pytest.mark.slow, pytest.mark.timeout(1800)], id="long")]


def fuzz(max_examples: int, deadline_s: float) -> settings:
    """Reproducible settings: the same examples every run, none remembered between runs."""
    return settings(max_examples=max_examples, deadline=deadline_s * 1000, derandomize=True, database=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                            HealthCheck.filter_too_much])


class Stop(Exception):
    """Raised by the stand-ins for long work (capture, evaluation, training): the input was accepted."""


@contextlib.contextmanager
def captured() -> Any:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


def cli(argv: list[str]) -> tuple[int | str, str, str]:
    """(exit status, or 'stopped' when the long work would have started; stdout; stderr) of `vdopt ARGV`."""
    with captured() as (out, err):
        try:
            code: int | str = main(argv)
        except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
            code = exc.code if isinstance(exc.code, int) else 2
        except Stop:
            code = "stopped"
    return code, out.getvalue(), err.getvalue()


def assert_clean_refusal(command: str, code: int | str, out: str, err: str, argv: Any = None) -> None:
    """Exit 0 (or accepted up to the long work), or 2 with one error paragraph; never a traceback."""
    assert "Traceback" not in out + err, (argv, err)
    assert code in (0, 2, "stopped"), (argv, code, err)
    if code == 2 and not err.startswith("usage:"):
        errors = [line for line in err.splitlines() if line.startswith(f"vdopt {command}: error:")]
        assert len(errors) == 1, (argv, err)


def tree(directory: Path, skip: str | None = None) -> dict[str, bytes | None]:
    """Every path under `directory` (but under its entry `skip`) with the contents of its files (None for directories)."""
    return {p.relative_to(directory).as_posix(): None if p.is_dir() else p.read_bytes()
            for p in sorted(directory.rglob("*")) if not p.is_symlink() and p.relative_to(directory).parts[0] != skip}


# ----- strategies: values a clumsy user (or a careless tool) puts where another value goes -------

NAUGHTY_STRINGS = ["", " ", "\t", "1", "-1", "0", "1e3", "nan", "inf", "-inf", "true", "null", "~", "🐶", "\x00", "\u202e",
                   "../../etc/passwd", "/etc/passwd", "${HOME}", "{{x}}", "%s%n", "a" * 300, "0x10", "1_000", "٣"]
SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 3, 1000, 1001, 2**31, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 0.5, 1.5, 1e308, 5e-324]),
    st.booleans(), st.none(),
    st.text(max_size=12), st.sampled_from(NAUGHTY_STRINGS),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
KEYS = st.one_of(st.sampled_from(["model", "sampler", "passes", "lower", "verify", "input", "params", "name", "steps",
                                  "frames", "min", "max", "opt", "psnr_min", "distill", "extra", "Model", "steps "]),
                 st.text(max_size=10))


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys and indices) into a nest of dicts and lists, the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, prefix + (index,))
    return found


def get(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


def numeric_neighbours(value: Any) -> st.SearchStrategy:
    """Out-of-range and wrongly typed stand-ins for a number."""
    near = [0, -1, -value if isinstance(value, (int, float)) else 1, True, False, math.nan, math.inf, -math.inf,
            2**63, 10**400, 1e308, str(value), [value], {"value": value}, None]
    return st.sampled_from(near)


@st.composite
def mutated(draw: Callable, bases: list[dict], keys: st.SearchStrategy = KEYS,
            leaves: Callable[[tuple, Any], st.SearchStrategy] | None = None, focus: tuple[str, ...] = ()) -> dict:
    """A deep copy of one of `bases` with one to four mutations at random places (three times in four under
    a top-level key of `focus`, when given): a new value of any type (or one that fits the place, from
    `leaves`), a neighbouring bad number, a deleted key or item, an unknown key or list item, a value
    wrapped in a list or mapping, or deep nesting."""
    data = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 4))):
        candidates = paths(data)
        focused = [p for p in candidates if p[:1] and p[0] in focus]
        path = draw(st.sampled_from(focused if focused and draw(st.integers(0, 3)) else candidates))
        old = get(data, path)
        op = draw(st.sampled_from(["replace", "replace", "number", "delete", "add", "wrap", "nest"]))
        if op == "add" and isinstance(old, dict):
            old[draw(keys)] = draw(VALUES if leaves is None else leaves(path + ("?",), None))
            continue
        if op == "add" and isinstance(old, list):
            old.append(draw(VALUES if leaves is None else leaves(path + (len(old),), None)))
            continue
        if not path:
            continue  # the root itself is only added to; a replaced root is the raw-text test's job
        parent, key = get(data, path[:-1]), path[-1]
        if op == "delete":
            del parent[key]
            continue
        if op == "number" or (op == "replace" and leaves is not None and draw(st.booleans())):
            new = draw(leaves(path, old) if leaves is not None and op == "replace" else numeric_neighbours(old))
        elif op == "wrap":
            new = draw(st.sampled_from([[old], {"value": old}, {str(key): old}]))
        elif op == "nest":
            new = old
            for _ in range(draw(st.integers(1, 120))):
                new = [new] if draw(st.booleans()) else {"a": new}
        else:
            new = draw(VALUES)
        parent[key] = new
    return data


def dump(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True)


# ----- recipes --------------------------------------------------------------------------------------

INT_FIELDS = {("sampler", "steps"), ("model", "input", "text_len"), ("verify", "prompts"),
              ("verify", "seed")}
FLOAT_FIELDS = {("sampler", "shift"), ("sampler", "guidance_scale"), ("verify", "psnr_mean"), ("verify", "psnr_worst"),
                ("verify", "psnr_p5"), ("verify", "accuracy_drop")}


def raw_numbers(raw: dict) -> list[tuple[tuple, Any]]:
    """(path, value) of each number the recipe file gave to a numeric field of the schema."""
    found = []
    for path in INT_FIELDS | FLOAT_FIELDS:
        try:
            found.append((path, get(raw, path)))
        except (KeyError, IndexError, TypeError):
            pass
    for dim in ("batch", "frames", "height", "width"):
        try:
            value = get(raw, ("model", "input", dim))
        except (KeyError, TypeError):
            continue
        items = value.items() if isinstance(value, dict) else [("", value)]
        found += [(("model", "input", dim, k), v) for k, v in items]
    try:
        for i, profile in enumerate(raw["lower"]["profiles"] or []):
            found += [(("lower", "profiles", i, k), v) for k, v in profile.items()]
    except (KeyError, TypeError, AttributeError):
        pass
    return found


def recipe_is_valid(recipe: Recipe, raw: dict) -> None:
    """What an accepted recipe must satisfy: the schema's bounds (all numbers finite), and no value of the
    wrong kind taken as a number (a YAML `true` is not a step count)."""
    for path, value in raw_numbers(raw):
        assert not isinstance(value, bool), f"{'.'.join(map(str, path))}: {value!r} accepted as a number"
    sampler, verify, spec = recipe.sampler, recipe.verify, recipe.model.input
    assert 1 <= sampler.steps <= 1000 and type(sampler.steps) is int
    assert math.isfinite(sampler.shift) and sampler.shift > 0
    assert math.isfinite(sampler.guidance_scale) and sampler.guidance_scale >= 0
    for bound in (verify.psnr_mean, verify.psnr_worst, verify.psnr_p5):
        assert bound is None or 0 < bound < 1000
    assert verify.accuracy_drop is None or 0 <= verify.accuracy_drop <= 100
    assert 1 <= verify.prompts <= 256 and 0 <= verify.seed < 2**31
    assert spec.text_len >= 1
    for dim in (spec.batch, spec.frames, spec.height, spec.width):
        assert 1 <= dim.min <= dim.trace_size <= dim.max
    for profile in recipe.lower.profiles or []:
        assert min(profile.frames, profile.height, profile.width) >= 1
    for spec_ in recipe.passes:
        assert isinstance(spec_.name, str) and isinstance(spec_.params, dict)


def load_or_refuse(path: Path, loader: Callable = load_recipe) -> Any:
    """The loaded recipe, or None when refused with a RecipeError; anything else fails the test."""
    start = time.perf_counter()
    try:
        result = loader(path)
    except RecipeError as exc:
        assert str(exc).strip() and "\n" not in str(exc)
        result = None
    event("refused" if result is None else "accepted")
    assert time.perf_counter() - start < 10, "a recipe took over 10 s to load or refuse"
    return result


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("scale", SCALES)
def test_mutated_recipes_load_or_are_refused(scratch, scale):
    @fuzz(150 * scale, 5)
    @given(mutated(COMPILE_BASES))
    def check(data):
        path = scratch / "recipe.yaml"
        path.write_text(dump(data), encoding="utf-8")
        recipe = load_or_refuse(path)
        if recipe is not None:
            recipe_is_valid(recipe, data)

    check()


# YAML's own value syntax: dates, tags, bases, sexagesimal, merge keys, sets, complex keys, long numbers.
YAML_SNIPPETS = ["2001-02-30", "0000-01-01", "2001-01-01 25:00:00", "!!timestamp x", "!!float x", "!!int x", "!!bool x",
                 "!!binary '%%%'", "1" * 5000, "0x" + "f" * 5000, "-" + "9" * 4400, "1:" + "2" * 5000, "!!str 1",
                 "!!python/object/apply:os.system [echo]", "!!set {a, b}", "!!omap [a: 1]", "!!pairs [a: 1]",
                 "<<: {steps: 1}", "? [a]\n: b", "? {a: 1}\n: b", ".NaN", "-.inf", "0o17", "0b101", "1_000", "1:30",
                 "~", "yes", "off", "Y", "%YAML 1.1\n---\n", "--- !!map\n", "...\n", "'\\x00'", '"\\ud800"',
                 "&a 1", "*a", "!local x", "!<tag:yaml.org,2002:int> 1"]


@pytest.mark.parametrize("scale", SCALES)
def test_yaml_value_syntax_in_each_field(scratch, scale):
    """Each snippet of YAML value syntax as the value of each key of a valid recipe (flow style)."""
    lines = ["model:", "  family: wan", "  input:", "    frames: 2", "    height: 4", "    width: 4", "sampler:",
             "  steps: 2", "  shift: 1.0", "verify:", "  prompts: 4"]

    @fuzz(60 * scale, 5)
    @given(st.integers(0, len(lines) - 1), st.sampled_from(YAML_SNIPPETS))
    def check(line, snippet):
        edited = list(lines)
        edited[line] = edited[line].split(":")[0] + ": " + snippet
        path = scratch / "values.yaml"
        path.write_text("\n".join(edited) + "\n")
        recipe = load_or_refuse(path)
        if recipe is not None:
            recipe_is_valid(recipe, yaml.safe_load(path.read_text()))

    check()


@pytest.mark.parametrize("snippet, message", [
    pytest.param("1" * 5000, "cannot be read", id="5000-digits"),
    pytest.param("0x" + "f" * 5000, "an integer of 20000 bits", id="5000-hex-digits"),  # a ValueError printing it  # was a ValueError traceback (Python's limit on int digits)
    ("2001-02-30", "cannot be read"),  # an impossible date: a ValueError traceback
    ("!!timestamp x", "cannot be read"),  # an AttributeError traceback
    ("!!float x", "cannot be read"),
    ("!!bool x", "cannot be read"),  # a KeyError traceback
    ("true", "is a number, not true"),  # was accepted as one step
    ("[1, 2]", "valid integer"),
])
def test_found_recipe_values_are_refused_in_one_line(tmp_path, snippet, message):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{family: wan, input: {{frames: 2, height: 4, width: 4}}}}\nsampler:\n  steps: {snippet}\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)
    code, out, err = cli(["compile", str(path), "-o", str(tmp_path / "out.vdopt")])
    assert code == 2 and err.startswith("vdopt compile: error:") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.vdopt").exists()


def test_found_booleans_where_numbers_go_are_refused(tmp_path):
    from vdopt.distill.config import load_distill_recipe

    for edit in (lambda d: d["model"]["input"].update(batch=True), lambda d: d["sampler"].update(shift=False),
                 lambda d: d["model"]["input"].update(frames={"min": 1, "max": True}),
                 lambda d: d.update(verify={"prompts": True}), lambda d: d["distill"].update(grad_clip=True),
                 lambda d: d["distill"].update(betas=[False, 0.9]), lambda d: d["distill"].update(lr=math.inf),
                 lambda d: d["distill"].update(betas=[-1.0, 0.9]), lambda d: d["distill"].update(disc_blocks=[1, True])):
        data = copy.deepcopy(DISTILL["distill_reference.yaml"])
        edit(data)
        path = tmp_path / "d.yaml"
        path.write_text(dump(data))
        with pytest.raises(RecipeError):
            load_distill_recipe(path)


@pytest.mark.parametrize("scale", SCALES)
def test_random_yaml_text_and_bytes_load_or_are_refused(scratch, scale):
    text = st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                     st.sampled_from(YAML_SNIPPETS))
    shipped_text = [p.read_text() for p in sorted((ROOT / "recipes").glob("*.yaml"))]

    @st.composite
    def damaged(draw):
        """A shipped recipe's text with a slice replaced by random text (an editor accident)."""
        source = draw(st.sampled_from(shipped_text))
        start = draw(st.integers(0, len(source)))
        end = draw(st.integers(start, min(len(source), start + 40)))
        return source[:start] + draw(text) + source[end:]

    @fuzz(150 * scale, 5)
    @given(st.one_of(text, st.binary(max_size=300), damaged()))
    def check(content):
        path = scratch / "random.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        recipe = load_or_refuse(path)
        if recipe is not None:
            recipe_is_valid(recipe, yaml.safe_load(path.read_bytes()))

    check()


DISTILL_FLOATS = ("lr", "disc_lr", "weight_decay", "grad_clip", "adv_weight", "ema_decay")


@pytest.mark.parametrize("scale", SCALES)
def test_mutated_distill_recipes_load_or_are_refused(scratch, scale):
    from vdopt.distill.config import load_distill_recipe

    @fuzz(100 * scale, 5)
    @given(mutated(list(DISTILL.values())))
    def check(data):
        path = scratch / "distill.yaml"
        path.write_text(dump(data), encoding="utf-8")
        loaded = load_or_refuse(path, load_distill_recipe)
        if loaded is None:
            return
        recipe, section, _ = loaded
        recipe_is_valid(recipe, {k: v for k, v in data.items() if k != "distill"})
        raw = data.get("distill") or {}
        for key, value in raw.items() if isinstance(raw, dict) else ():
            assert not isinstance(value, bool), f"distill.{key}: {value!r} accepted as a number"
        for key in DISTILL_FLOATS:
            value = getattr(section, key)
            assert value is None or math.isfinite(value), f"distill.{key} = {value} accepted"
        assert all(0 <= beta < 1 for beta in section.betas), f"distill.betas = {section.betas} accepted"
        assert 1 <= section.student_steps <= recipe.sampler.steps

    check()


@pytest.fixture
def no_capture(monkeypatch):
    """`vdopt compile` stops where the model would be loaded: what it accepted got that far."""
    import vdopt.compiler

    def stop(*_args, **_kwargs):
        raise Stop

    monkeypatch.setattr(vdopt.compiler, "capture", stop)


@pytest.mark.parametrize("scale", SCALES)
def test_compile_refuses_mutated_recipes_with_one_paragraph(scratch, no_capture, scale):
    """Through the CLI: exit 2 with one `vdopt compile: error:` paragraph and nothing left at -o or beside it
    (no bundle, no staging debris), or accepted up to capture."""

    @fuzz(40 * scale, 10)
    @given(mutated(COMPILE_BASES))
    def check(data):
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            recipe, out = Path(tmp) / "r.yaml", Path(tmp) / "out.vdopt"
            recipe.write_text(dump(data), encoding="utf-8")
            code, stdout, stderr = cli(["compile", str(recipe), "-o", str(out)])
            assert_clean_refusal("compile", code, stdout, stderr, data)
            assert code != 0, "compile finished without capturing a model"
            assert sorted(os.listdir(tmp)) == ["r.yaml"], os.listdir(tmp)

    check()


SAFE_SAMPLER_EDITS = st.fixed_dictionaries({}, optional={
    "steps": st.sampled_from([1, 2, 0, -1, True, 1.0, "1", math.nan]),
    "shift": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans()),
    "guidance_scale": st.one_of(st.floats(min_value=-1, max_value=20), st.sampled_from([math.inf, math.nan, 1])),
    "kind": st.sampled_from(["flow_euler", "ddim", "euler", ""]),
    "prediction": st.sampled_from(["flow", "epsilon", "v_prediction", "x0"]),
})


@pytest.mark.parametrize("scale", [pytest.param(1, marks=pytest.mark.timeout(180), id="ci"),
                                   pytest.param(5, marks=[pytest.mark.slow, pytest.mark.timeout(1800)], id="long")])
def test_really_compiling_sampler_edits_of_the_reference_recipe(scratch, scale):
    """A handful of real compiles (reference model, one or two steps, torch): a sampler edit either
    compiles into a bundle that runs to finite output, or is refused before anything is written."""
    base = load_recipe(ROOT / "recipes" / "reference.yaml").model_dump(mode="json")
    base["sampler"]["steps"] = 1
    base["lower"] = {"backend": "torch"}

    @fuzz(3 * scale, 120)
    @given(SAFE_SAMPLER_EDITS)
    def check(edits):
        data = copy.deepcopy(base)
        data["sampler"].update(edits)
        if isinstance(data["sampler"]["steps"], int) and data["sampler"]["steps"] > 2:
            data["sampler"]["steps"] = 2
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            recipe, out = Path(tmp) / "r.yaml", Path(tmp) / "out.vdopt"
            recipe.write_text(dump(data))
            code, stdout, stderr = cli(["compile", str(recipe), str(TEACHER), "-o", str(out)])
            assert_clean_refusal("compile", code, stdout, stderr, edits)
            if code == 2:
                assert sorted(os.listdir(tmp)) == ["r.yaml"]
                return
            recipe_is_valid(load_recipe(recipe), data)
            clip = Path(tmp) / "clip.pt"
            code, stdout, stderr = cli(["run", str(out), "--prompt", "red circle moving up", "-o", str(clip), "--quiet"])
            assert code == 0, stderr
            assert torch.isfinite(torch.load(clip)).all()

    check()


# ----- manifests ------------------------------------------------------------------------------------
# A careless (not malicious) tool edits manifest.json and rewrites manifest.sha256 to match, so each
# edit reaches the manifest's validation, not only its checksum.

DIM_NAMES = ["frames", "height", "width", "frames_units", "height_units", "width_units"]
SHAPE_ATOMS = st.one_of(st.integers(-3, 70).map(str), st.sampled_from(DIM_NAMES),
                        st.sampled_from(["batch", "x", "__import__", "os", "True", "None", "10**10", "1e3", "0.5", "''",
                                         "[]", "()", "frames.real", "frames()", "99999999999999999999", "lambda: 1"]))
SHAPE_EXPRESSIONS = st.recursive(
    SHAPE_ATOMS, lambda e: st.one_of(
        st.tuples(e, st.sampled_from(["+", "-", "*", "//", "/", "%", "**", "<<", "&", " and ", " if 1 else "]), e)
        .map(lambda t: f"({t[0]}{t[1]}{t[2]})"),
        e.map(lambda x: f"-{x}"), e.map(lambda x: f"abs({x})")),
    max_leaves=6)
SIZES = st.one_of(st.integers(-2, 70), st.sampled_from([0, -1, 2**31, 2**63, 10**30, True, None, 8.0, math.nan]),
                  SHAPE_EXPRESSIONS, st.sampled_from(NAUGHTY_STRINGS))
FILE_NAMES = st.one_of(
    st.sampled_from(["segments/step_0.pt2", "extras/conditioner.safetensors", "segments", "extras", "", ".", "./segments/step_0.pt2",
                     "segments//step_0.pt2", "segments/../segments/step_0.pt2", "../b.vdopt/segments/step_0.pt2",
                     "/etc/passwd", "/dev/zero", "manifest.json", "manifest.sha256", "missing.pt2", "segments/step_0.PT2",
                     "C:\\x", "segments\\step_0.pt2", "\x00", "segments/step_0.pt2\x00", "~/x", "$HOME/x"]),
    st.text(max_size=30))
DIGESTS = st.one_of(st.sampled_from(["0" * 64, "A" * 64, "g" * 64, "0" * 63, "", "sha256:" + "0" * 64]),
                    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), VALUES)
DTYPE_NAMES = ["float32", "bfloat16", "float16", "int64", "bool", "uint8", "float64", "int8", "os.system", ""]
TENSOR_SPECS = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "i", "cond.encoder_hidden_states", "uncond.encoder_hidden_states", "x_next",
                              "state.cache", "", "cond.other"]),
     "shape": st.lists(SIZES, max_size=5), "dtype": st.sampled_from(DTYPE_NAMES)},
    optional={"init": st.sampled_from(["zeros", "ones", "randn", None])})
MANIFEST_KEYS = st.one_of(st.sampled_from(["schema_version", "family", "inputs", "outputs", "state", "step_table",
                                           "segments", "checksums", "latent", "num_steps", "guidance", "extras", "parts",
                                           "kind", "flag", "dims", "files", "backend", "name", "multiples", "batch",
                                           "channels", "default_sizes", "verify", "cache"]),
                          FILE_NAMES, st.text(max_size=10))


def manifest_leaf(path: tuple, old: Any) -> st.SearchStrategy:
    """A replacement that fits where it goes (a size in a shape, a file name in a file list, a digest in
    the checksums, a spec in a tensor list), or anything at all."""
    keys = [k for k in path if isinstance(k, str)]
    if "shape" in keys:
        return SIZES
    if "checksums" in keys:
        return DIGESTS
    if keys[-1:] == ["files"] or "files" in keys[-2:] or keys[-1:] == ["file"]:
        return st.one_of(FILE_NAMES, st.lists(FILE_NAMES, max_size=3))
    if keys and keys[-1] in ("inputs", "outputs", "state"):
        return st.one_of(TENSOR_SPECS, st.lists(TENSOR_SPECS, max_size=3)) if type(path[-1]) is int or old is None else \
            st.lists(TENSOR_SPECS, max_size=3)
    if keys and keys[-1] in ("dims", "frames", "height", "width", "default_sizes", "multiples", "batch", "channels",
                             "num_steps", "schema_version"):
        return st.one_of(SIZES, st.lists(st.integers(-2, 2**40), max_size=4))
    if keys and keys[-1] in ("dtype", "backend", "family", "kind", "name", "flag", "init"):
        return st.one_of(st.sampled_from(DTYPE_NAMES + ["torch", "aoti", "onnx", "tensorrt", "reference", "wan", "split",
                                                        "step", "head", "compute", "reuse", "tail"]), VALUES)
    return VALUES


def reseal(bundle: Path, manifest: Any, indent: int | None = 2) -> None:
    """Writes `manifest` as JSON (NaN and Infinity included, as Python's json does) and recomputes manifest.sha256."""
    text = json.dumps(manifest, indent=indent).encode()
    (bundle / MANIFEST).write_bytes(text)
    (bundle / MANIFEST_CHECKSUM).write_text(f"{hashlib.sha256(text).hexdigest()}  {MANIFEST}\n")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """One real bundle for the module: the reference model, one step, torch backend (a few seconds)."""
    data = load_recipe(ROOT / "recipes" / "reference.yaml").model_dump(mode="json")
    data["sampler"]["steps"] = 1
    data["lower"] = {"backend": "torch"}
    directory = tmp_path_factory.mktemp("bundle")
    (directory / "r.yaml").write_text(yaml.safe_dump(data))
    code, _, err = cli(["compile", str(directory / "r.yaml"), str(TEACHER), "-o", str(directory / "b.vdopt")])
    assert code == 0, err
    return directory / "b.vdopt"


@contextlib.contextmanager
def edited_copy(bundle: Path, manifest: Any, scratch: Path):
    """A copy of `bundle` with `manifest` sealed in, in a fresh directory that is also the working directory;
    yields (copy, directory) and checks that nothing but the run's own output appeared or changed."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        directory = Path(tmp)
        copy_ = directory / bundle.name
        shutil.copytree(bundle, copy_)
        reseal(copy_, manifest)
        before, cwd = tree(directory), os.getcwd()
        os.chdir(directory)
        try:
            yield copy_, directory
        finally:
            os.chdir(cwd)
        after = tree(directory)
        changed = sorted(k for k in set(before) | set(after) if before.get(k, 0) != after.get(k, 0) and k != "clip.pt")
        assert not changed, f"files written or changed: {changed}"


RUNTIME_KEYS = ("schema_version", "family", "inputs", "outputs", "state", "step_table", "segments", "checksums", "latent",
                "num_steps", "guidance", "extras")


def manifest_mutations(bundle: Path) -> st.SearchStrategy:
    original = json.loads((bundle / MANIFEST).read_text())
    return mutated([original], keys=MANIFEST_KEYS, leaves=manifest_leaf, focus=RUNTIME_KEYS)


def affordable(manifest: Any) -> bool:
    """False for a manifest whose latent or state tensors would take more than 256 MiB at its default sizes but
    less than the limit vdopt enforces (a real bundle may need that much; this test machine cannot)."""
    from vdopt.program import resolve_size

    try:
        latent = manifest["latent"]
        sizes = {k: latent["default_sizes"][k] for k in ("frames", "height", "width")}
        shapes = [[latent["batch"], latent["channels"], *sizes.values()]] + [s["shape"] for s in manifest["state"]]
        for shape in shapes:
            elements = 1
            for size in shape:
                elements *= max(resolve_size(size, sizes, latent["multiples"]), 1)
            if elements > 1 << 26:
                return False
    except Exception:  # noqa: BLE001 - a manifest this malformed is refused before anything is allocated
        return True
    return True


@pytest.mark.parametrize("scale", SCALES)
def test_inspect_of_edited_manifests(bundle, scratch, scale):
    @fuzz(120 * scale, 10)
    @given(manifest_mutations(bundle), st.booleans())
    def check(manifest, graph):
        with edited_copy(bundle, manifest, scratch) as (copy_, _):
            code, out, err = cli(["inspect", str(copy_), *(["--graph"] if graph else [])])
            assert_clean_refusal("inspect", code, out, err, manifest)

    check()


@pytest.mark.parametrize("scale", [pytest.param(1, marks=pytest.mark.timeout(150), id="ci"),
                                   pytest.param(10, marks=[pytest.mark.slow, pytest.mark.timeout(1800)], id="long")])
def test_running_edited_manifests(bundle, scratch, scale):
    """`vdopt run` (one step, the real program) of an edited bundle: a clip of finite values with the
    manifest's latent shape, or one error paragraph; nothing written but the clip."""

    @fuzz(40 * scale, 30)
    @given(manifest_mutations(bundle).filter(affordable))
    def check(manifest):
        with edited_copy(bundle, manifest, scratch) as (copy_, directory):
            code, out, err = cli(["run", str(copy_), "--prompt", "red circle moving up", "-o", "clip.pt", "--quiet"])
            assert_clean_refusal("run", code, out, err, manifest)
            if code == 0:
                video = torch.load(directory / "clip.pt")
                assert torch.isfinite(video).all()
            else:
                assert not (directory / "clip.pt").exists()

    check()


# Found by the fuzzer (and by hand around its findings): each was a traceback from inside the runtime or
# torch.export (IndexError, KeyError, guard failure, pytree mismatch, InvalidProtobuf, allocation
# failure), or ran and wrote a clip of noise (num_steps 0), or ran with the wrong dtype.
FOUND_MANIFEST_EDITS = {
    "num_steps 0 (wrote pure noise)": (lambda m: m.update(num_steps=0), "num_steps"),
    "num_steps beyond the step table": (lambda m: m.update(num_steps=5), "step table holds 1"),
    "guidance false with uncond inputs": (lambda m: m.update(guidance=False), "guidance is false"),
    "an uncond input dropped": (lambda m: m["inputs"].pop(3), "guidance is true"),
    "latent.channels": (lambda m: m["latent"].update(channels=4), "latent.channels"),
    "latent.dtype": (lambda m: m["latent"].update(dtype="bool"), "latent.dtype"),
    "default frames": (lambda m: (m["latent"]["default_sizes"].update(frames=16),
                                  m["segments"][0]["dims"].update(frames=[1, 100])), "default_sizes.frames"),
    "default frames, x made dynamic": (lambda m: (m["latent"]["default_sizes"].update(frames=16),
                                                  m["segments"][0]["dims"].update(frames=[1, 100]),
                                                  m["inputs"][0].update(shape=[1, 3, "frames", 32, 32])), "its input 0"),
    "a state the program does not take": (lambda m: m["state"].append({"name": "s", "shape": [1, "frames"], "dtype": "float32"}),
                                          "takes 4 inputs"),
    "a negative state size": (lambda m: m["state"].append({"name": "s", "shape": ["-frames"], "dtype": "float32"}), "negative"),
    "a state size dividing by zero": (lambda m: m["state"].append({"name": "s", "shape": ["frames//(frames-frames)"],
                                                                   "dtype": "float32"}), "divides by zero"),
    "a state of 4 EB": (lambda m: m["state"].append({"name": "s", "shape": [10**6] * 3, "dtype": "float32"}), "far beyond"),
    "cond dtype (ran with int64 conditioning)": (lambda m: m["inputs"][2].update(dtype="int64"), "input 2 is float32"),
    "backend onnx on a .pt2": (lambda m: m["segments"][0].update(backend="onnx"), "onnxruntime cannot load"),
    "backend aoti on a .pt2": (lambda m: m["segments"][0].update(backend="aoti"), "not a loadable AOTInductor"),
    "kind split without parts": (lambda m: m["segments"][0].update(kind="split"), "parts"),
    "no segment files": (lambda m: m["segments"][0].update(files=[]), "at least one file"),
    "no segment dims (KeyError)": (lambda m: m["segments"][0].pop("dims"), "dims should be"),
    "schema_version true": (lambda m: m.update(schema_version=True), "manifest schema"),
    "a list where a dtype goes": (lambda m: m["outputs"][0].update(dtype=["float32"]), "dtype should be"),
    "an object where latent.dtype goes": (lambda m: m["latent"].update(dtype={"a": 1}), "latent.dtype"),
}
# The segment lists its own inputs and state; the edits above change the manifest's and the segment's alike.
SEGMENT_EDITS = {
    "a segment state other than the manifest's": (lambda m: m["segments"][0]["state"].append(
        {"name": "s", "shape": [1], "dtype": "float32"}), "segments[0].state names other tensors"),
    "a segment input dtype other than the manifest's": (lambda m: m["segments"][0]["inputs"][2].update(dtype="int64"),
                                                        "segments[0].inputs names other tensors (or dtypes)"),
}


def edited_alike(edit):
    def apply(manifest):
        edit(manifest)
        for key in ("inputs", "state"):
            manifest["segments"][0][key] = manifest[key]
    return apply


@pytest.mark.parametrize("edit, message", [(edited_alike(edit), message) for edit, message in FOUND_MANIFEST_EDITS.values()]
                         + list(SEGMENT_EDITS.values()), ids=[*FOUND_MANIFEST_EDITS, *SEGMENT_EDITS])
def test_found_manifest_edits_are_one_paragraph(bundle, scratch, edit, message):
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    with edited_copy(bundle, manifest, scratch) as (copy_, directory):
        code, out, err = cli(["run", str(copy_), "--prompt", "red circle moving up", "-o", "clip.pt", "--quiet"])
        assert_clean_refusal("run", code, out, err)
        assert code == 2 and message in err, err
        assert not (directory / "clip.pt").exists()
        code, out, err = cli(["inspect", str(copy_)])
        assert_clean_refusal("inspect", code, out, err)


# ----- command lines --------------------------------------------------------------------------------
# Random argv over every subcommand, from pools of paths (a valid recipe, a bundle, missing and odd
# names, all inside a scratch working directory) and values (numbers out of range, words, empty
# strings, flags where values go). The long work never starts: compile stops at capture, eval at the
# evaluation, distill at loading the teacher, calibrate at its first build, and run runs the bundle's
# real loop and output writing over a stand-in step (the real program is `test_running_edited_manifests`'s).

NUMBER_WORDS = ["0", "1", "-1", "2", "8", "32", "1.5", "nan", "inf", "-inf", "1e309", "9" * 20, "0x10", "abc", "", " ",
                "🐶", "1_0", "+3", "٣"]
WORDS = ["", " ", "-", "--", "🐶", "a" * 300, "\t", "x=y", "=", "--quiet", "-o", "-h"]
PATH_WORDS = ["a" * 300 + ".yaml", "notes.txt/x", "bad.safetensors", "r.yaml", "ref.yaml", "distill.yaml", "b.vdopt", "missing.yaml", "notes.txt", "empty", "teacher.safetensors",
              "cond.safetensors", "teacher", "", ".", "🐶.yaml", "b.vdopt/manifest.json", "b.vdopt/segments/step_0.pt2"]
OUTPUT_WORDS = ["a" * 300 + ".vdopt", "notes.txt/x.pt", "out.vdopt", "clip.pt", "clip.gif", "clip.safetensors", "clip.txt", "clip", "out.json", "out.yaml",
                "sub/dir/clip.pt", "empty", "notes.txt", "b.vdopt", ".", "..", "", "trace.json"]
VALUE_POOLS = {
    "device": ["cpu", "cuda", "tpu", "meta", "cpu:0", "cuda:99", "", "potato", "CPU"],
    "prompt": ["red circle moving up", "blue square moving down-right", "", "🐶", "red " * 200],
    "budget": ["psnr=30", "psnr=-5", "psnr=nan", "psnr=inf", "psnr_worst=26,psnr=30", "accuracy=1", "psnr", "=", "",
               "psnr=30,psnr=31", "psnr_p5=1e309"],
    "param": ["warmup=2", "x=y", "=", "interval=0", "threshold=nan", "max_reuse=-5", "first=1e400", "policy=static"],
    "grid": ["0.1,0.2", "", ",", "nan", "1,a", "-1", "inf,0", "1e309"],
    "policy": ["static", "first_blocks", "teacache", "adacache", "potato", ""],
    "search": ["threshold", "interval", "potato", ""],
    "stage": ["all", "trajectories", "train", "export", "potato"],
}


def subcommand_options() -> dict[str, tuple[list, list]]:
    """{subcommand: (positional dests, [(flag, takes a value, value kind)])} read from the real parser."""
    from vdopt.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    found = {}
    for name, sub in subparsers.choices.items():
        positional, options = [], []
        for action in sub._actions:
            if not action.option_strings:
                positional.append(action.dest)
                continue
            takes = action.nargs != 0
            kind = action.dest if action.dest in VALUE_POOLS else "number" if action.type in (int, float) else \
                "output" if action.dest in ("output", "json_path", "sheet_path", "trace", "dump_ir", "cache") else "path"
            options += [(flag, takes, kind) for flag in action.option_strings]
        found[name] = (positional, options)
    return found


def value_of(kind: str) -> st.SearchStrategy:
    if kind in VALUE_POOLS:
        return st.sampled_from(VALUE_POOLS[kind] + WORDS[:3])
    if kind == "number":
        return st.one_of(st.sampled_from(NUMBER_WORDS), st.integers(-(2**63), 2**63 - 1).map(str))
    return st.sampled_from((OUTPUT_WORDS if kind == "output" else PATH_WORDS) + WORDS)


GOOD_POSITIONALS = {"compile": ["r.yaml"], "run": ["b.vdopt", "--prompt", "red circle moving up"], "inspect": ["b.vdopt"],
                    "eval": ["b.vdopt"], "distill": ["distill.yaml", "teacher.safetensors"],
                    "calibrate": ["ref.yaml", "teacher.safetensors"]}
def command_line_files(directory: Path, bundle: Path) -> None:
    """The files the random and the found command lines name: a bundle, weights, recipes, junk."""
    shutil.copytree(bundle, directory / "b.vdopt")
    shutil.copy(TEACHER, directory / "teacher.safetensors")
    (directory / "r.yaml").write_text(dump(VALID))
    (directory / "ref.yaml").write_text((bundle.parent / "r.yaml").read_text())
    (directory / "distill.yaml").write_text((ROOT / "recipes" / "distill_reference.yaml").read_text())
    (directory / "notes.txt").write_text("not a recipe\n")
    (directory / "bad.safetensors").write_bytes(b"\xff" * 64)


@st.composite
def command_lines(draw: Callable, options: dict[str, tuple[list, list]]) -> list[str]:
    command = draw(st.sampled_from(sorted(options) + ["", "potato", "--help", "-h", "--version"]))
    if command not in options:
        return [command] if command else []
    positional, flags = options[command]
    if command in GOOD_POSITIONALS and draw(st.booleans()):
        argv = [command, *GOOD_POSITIONALS[command]]  # get past the positionals half the time
    else:
        argv = [command] + [draw(value_of("output" if dest == "output" else "path")) for dest in positional
                            if draw(st.integers(0, 5))]
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 9)) == 0:
            argv.append(draw(st.sampled_from(["--potato", "-x", "--", "--output=", "--seed=1", "--frames=8", "-oclip.pt"])))
            continue
        flag, takes, kind = draw(st.sampled_from(flags))
        argv += [flag] + ([draw(value_of(kind))] if takes else [])
    if draw(st.integers(0, 3)) and not any(a in ("-o", "--output") or a.startswith(("-o", "--output=")) for a in argv):
        argv += ["-o", draw(value_of("output"))]  # most subcommands need -o: get past it more often than not
    return argv


class StandInBackend:
    """Loads nothing; its step returns the latent unchanged (and the state), in the manifest's order."""

    name = "torch"

    def load(self, directory, files, device):
        return lambda x, i, *rest: (x,)


@pytest.fixture
def long_work_stopped(monkeypatch):
    import vdopt.calibrate
    import vdopt.compiler
    import vdopt.distill.common
    import vdopt.eval.suite
    import vdopt.runtime.session

    def stop(*_args, **_kwargs):
        raise Stop

    monkeypatch.setattr(vdopt.compiler, "capture", stop)
    monkeypatch.setattr(vdopt.eval.suite, "evaluate", stop)
    monkeypatch.setattr(vdopt.distill.common, "load_teacher", stop)
    monkeypatch.setattr(vdopt.calibrate, "Bundler", stop)
    monkeypatch.setattr(vdopt.runtime.session, "get_backend", lambda name: StandInBackend())


@pytest.mark.parametrize("scale", SCALES)
def test_random_command_lines(bundle, scratch, long_work_stopped, scale):
    """Exit 0 or 2 (argparse's usage errors are 2), one error paragraph, no traceback; the bundle and the
    recipes given as input are never changed; nothing is written outside the working directory."""
    from safetensors.torch import save_file

    options = subcommand_options()
    workdir = scratch / "argv"
    workdir.mkdir()
    command_line_files(workdir, bundle)
    (workdir / "empty").mkdir()
    save_file({"cond.encoder_hidden_states": torch.zeros(1, 3, 64)}, str(workdir / "cond.safetensors"))
    inputs = tree(workdir)
    outside = tree(scratch, skip="argv")
    threads = torch.get_num_threads()

    @fuzz(150 * scale, 20)
    @given(command_lines(options))
    def check(argv):
        cwd = os.getcwd()
        os.chdir(workdir)
        try:
            code, out, err = cli(argv)
        finally:
            os.chdir(cwd)
            torch.set_num_threads(threads)
        assert_clean_refusal(argv[0] if argv else "", code, out, err, argv)
        now = tree(workdir)
        assert all(now.get(k, 0) == v for k, v in inputs.items()), "an input file was changed or removed"
        for name in set(now) - set(inputs):  # outputs of this case: remove them for the next one
            path = workdir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        assert tree(scratch, skip="argv") == outside, "a file was written outside the working directory"

    check()


# Found by the fuzzer in the command lines: each was a traceback (or replaced a user's file).
@pytest.mark.parametrize("argv, message", [
    (["compile", "r.yaml", "-o", "a" * 300 + ".vdopt"], "cannot be a bundle path"),  # OSError: file name too long
    (["compile", "a" * 300 + ".yaml", "-o", "out.vdopt"], "cannot be a recipe file"),
    (["inspect", "a" * 300], "File name too long"),
    (["eval", "a" * 300 + ".vdopt"], "not a vdopt bundle"),
    (["eval", "--device", ""], "not one torch knows"),  # RuntimeError building the teacher on device ''
    (["eval", "--threads", "-3"], "positive number of CPU threads"),
    (["distill", "distill.yaml", "teacher.safetensors", "-o", "notes.txt"], "existing file"),  # FileExistsError
    (["distill", "distill.yaml", "teacher.safetensors", "-o", "a" * 300], "cannot create"),
    (["distill", "distill.yaml", "teacher.safetensors", "-o", "student", "--threads", "-30671070127351"], "positive number"),
    (["calibrate", "ref.yaml", "-o", "out.yaml", "--grid", " "], "comma-separated numbers"),  # ValueError
    (["calibrate", "ref.yaml", "-o", "out.yaml", "--grid", "0.1,nan"], "finite"),
    (["run", "b.vdopt", "--prompt", "red circle moving up", "-o", "clip.pt", "--cond", "a" * 300], "not found"),
    (["run", "b.vdopt", "-o", "clip.pt", "--cond", "bad.safetensors"], "not a readable safetensors"),
])
def test_found_command_lines_are_one_paragraph(bundle, tmp_path, monkeypatch, argv, message):
    command_line_files(tmp_path, bundle)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    code, out, err = cli(argv)
    assert_clean_refusal(argv[0], code, out, err, argv)
    assert code == 2 and message in err, err
    assert tree(tmp_path) == before


# Found by the fuzzer: output paths checked only after the steps, seeds beyond int64, names too long for
# the file system, `schema -o` writing anywhere.
@pytest.mark.parametrize("extra", [["-o", "notes.txt/clip.pt"], ["-o", "clip.pt", "--trace", "empty"],
                                   ["-o", "clip.pt", "--seed", str(2**64)]], ids=["output-under-a-file", "trace-dir", "seed"])
def test_run_output_paths_and_seeds_are_one_paragraph(bundle, tmp_path, monkeypatch, extra):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    code, out, err = cli(["run", str(bundle), "--prompt", "red circle moving up", "--quiet", *extra])
    assert_clean_refusal("run", code, out, err)
    assert code == 2 and sorted(os.listdir(tmp_path)) == ["empty", "notes.txt"]


@pytest.mark.parametrize("argv", [["run", "BUNDLE", "--prompt", "red circle moving up", "-o", "a" * 300 + ".pt"],
                                  ["calibrate", "r.yaml", "-o", "a" * 300 + ".yaml"], ["eval", "--json", "a" * 300]],
                         ids=["run", "calibrate", "eval"])
def test_output_names_too_long_are_one_paragraph(bundle, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(dump(VALID))
    code, out, err = cli([str(bundle) if a == "BUNDLE" else a for a in argv])
    assert_clean_refusal(argv[0], code, out, err)


@pytest.mark.parametrize("output", ["empty", "a" * 300 + ".json", "notes.txt"])
def test_schema_output_path_is_checked_cleanly(tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("precious")
    code, out, err = cli(["schema", "-o", output])
    assert_clean_refusal("schema", code, out, err)
    assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("scale", SCALES)
def test_random_manifest_bytes_and_checksum_files(bundle, scratch, scale):
    """manifest.json replaced by random bytes (sealed, or with a random manifest.sha256): one paragraph."""

    @fuzz(60 * scale, 10)
    @given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                     st.builds(lambda v: json.dumps(v).encode(), VALUES)),
           st.one_of(st.none(), st.binary(max_size=100)))
    def check(raw, checksum):
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            copy_ = Path(tmp) / "b.vdopt"
            shutil.copytree(bundle, copy_)
            (copy_ / MANIFEST).write_bytes(raw)
            (copy_ / MANIFEST_CHECKSUM).write_bytes(
                checksum if checksum is not None else f"{hashlib.sha256(raw).hexdigest()}  {MANIFEST}\n".encode())
            for argv in (["inspect", str(copy_)], ["run", str(copy_), "--prompt", "red circle moving up", "-o",
                                                   str(Path(tmp) / "clip.pt"), "--quiet"]):
                code, out, err = cli(argv)
                assert_clean_refusal(argv[0], code, out, err, raw)
                assert code == 2

    check()


@pytest.mark.parametrize("scale", [pytest.param(1, marks=pytest.mark.timeout(120), id="ci"),
                                   pytest.param(10, marks=[pytest.mark.slow, pytest.mark.timeout(1800)], id="long")])
def test_damaged_files_with_recomputed_checksums(bundle, scratch, scale):
    """A segment or extras file truncated or with bytes changed, its checksum entry recomputed (a careless
    copy tool that 'repairs' checksums): `vdopt run` refuses it in one paragraph or runs to finite output."""

    @fuzz(8 * scale, 30)
    @given(st.sampled_from(["segments/step_0.pt2", "extras/conditioner.safetensors"]), st.data())
    def check(name, data):
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            copy_ = Path(tmp) / "b.vdopt"
            shutil.copytree(bundle, copy_)
            content = bytearray((copy_ / name).read_bytes())
            if data.draw(st.booleans(), label="truncate"):
                content = content[:data.draw(st.integers(0, len(content) - 1), label="length")]
            else:
                for _ in range(data.draw(st.integers(1, 8), label="flips")):
                    content[data.draw(st.integers(0, len(content) - 1), label="at")] = data.draw(st.integers(0, 255))
            (copy_ / name).write_bytes(bytes(content))
            manifest = json.loads((copy_ / MANIFEST).read_text())
            manifest["checksums"][name] = hashlib.sha256(bytes(content)).hexdigest()
            reseal(copy_, manifest)
            clip = Path(tmp) / "clip.pt"
            code, out, err = cli(["run", str(copy_), "--prompt", "red circle moving up", "-o", str(clip), "--quiet"])
            assert_clean_refusal("run", code, out, err, name)
            if code == 0:
                assert torch.isfinite(torch.load(clip)).all()

    check()


def damage_member_header(archive: bytes, member: str) -> bytes:
    """The zip archive with the local header of its first member named ...`member` zeroed (its directory intact)."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        offset = next(i.header_offset for i in zf.infolist() if i.filename.endswith(member))
    return archive[:offset] + bytes(30) + archive[offset + 30:]


@pytest.mark.parametrize("name, damage, message", [
    # was torch's RuntimeError (a member's data zeroed inside an intact zip)
    ("segments/step_0.pt2", lambda b: damage_member_header(b, "weight_0"), "torch.export cannot read it"),
    ("extras/conditioner.safetensors", lambda b: b[:len(b) // 2], "not the prompt conditioner"),  # was a SafetensorError
    ("extras/conditioner.safetensors", lambda b: b"", "not the prompt conditioner"),
], ids=["pt2-zeroed", "conditioner-half", "conditioner-empty"])
def test_found_damaged_files_with_recomputed_checksums(bundle, tmp_path, name, damage, message):
    copy_ = tmp_path / "b.vdopt"
    shutil.copytree(bundle, copy_)
    content = damage((copy_ / name).read_bytes())
    (copy_ / name).write_bytes(content)
    manifest = json.loads((copy_ / MANIFEST).read_text())
    manifest["checksums"][name] = hashlib.sha256(content).hexdigest()
    reseal(copy_, manifest)
    code, out, err = cli(["run", str(copy_), "--prompt", "red circle moving up", "-o", str(tmp_path / "c.pt"), "--quiet"])
    assert_clean_refusal("run", code, out, err)
    assert code == 2 and message in err, err
