"""Reading files from others without running their code (ARCHITECTURE contract 7, trust model).

Recipes, checkpoints, `.pt2` programs and bundles are data. Three things in them would run code
if read naively, and each gets a safe reader here:

- **Shape expressions** in a manifest (`32*frames*height_units`) are parsed by a small grammar
  (integers, latent dim names, `+ - * //`, parentheses) and evaluated by walking the tree; they
  never reach `eval` or `sympy.sympify`.
- **`torch.export` programs**: `torch.export.load` unpickles weights, constants and sample inputs
  with `weights_only=False`, passes the archive's shape strings to `sympy.sympify` (which
  evaluates them), and `ExportedProgram.module()` `exec`s the archive's `guards_code`.
  `load_exported_program` checks the archive's members, forces every unpickling to torch's
  weights-only unpickler (tensors and plain containers; no imports, no calls), refuses the
  pickled object kinds that have no weights-only form, lets only expressions of a whitelisted
  grammar reach `sympify`, and checks the guards against the same kind of grammar before
  anything can run them. `--trust-pickle` restores the plain loader.
- **Zip archives** (AOTI packages, `.pt2` files): members with absolute paths, `..` components,
  backslashes or symlink modes are refused before anything is extracted (zip-slip).
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import stat
import threading
import types
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import torch

from vdopt.errors import VdoptError, first_line


class UnsafeInputError(VdoptError):
    """A file that should be data would run code, or names a path outside where it may."""


# ----- the shape grammar of manifests -------------------------------------------------------

MAX_EXPRESSION = 256
_SHAPE_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.FloorDiv: lambda a, b: a // b}


def shape_expression(text: str, names: set[str] | frozenset[str]) -> ast.expr:
    """Parses `text` as a size expression over `names`; raises ValueError (with the reason) if it is
    anything but integers, those names, `+ - * //` and parentheses."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_EXPRESSION:
        raise ValueError(f"a size must be an int or a non-empty expression of at most {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("it is not an expression") from None

    def check(node: ast.AST) -> None:
        if isinstance(node, ast.BinOp) and type(node.op) in _SHAPE_OPS:
            check(node.left)
            check(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            check(node.operand)
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            pass
        elif isinstance(node, ast.Name):
            if node.id not in names:
                raise ValueError(f"it names '{node.id}', which is not one of {', '.join(sorted(names))}")
        else:
            raise ValueError(f"'{ast.unparse(node)}' is outside the size grammar (integers, {', '.join(sorted(names))}, "
                             f"+ - * // and parentheses)")

    check(tree.body)
    return tree.body


def evaluate_shape(text: str, values: dict[str, Any]) -> Any:
    """The value of a size expression (see `shape_expression`) for the given dim values: ints give
    its int, sympy symbols give it as a sympy expression."""

    def value(node: ast.expr) -> int:
        if isinstance(node, ast.BinOp):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.FloorDiv) and right == 0:
                raise ValueError("it divides by zero")
            return _SHAPE_OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.Constant):
            return node.value
        return values[node.id]

    return value(shape_expression(text, frozenset(values)))


# ----- torch's own expression strings (inside .pt2 archives) --------------------------------

# Everything sympy's `srepr`/`str` and torch's shape printer write for symbolic sizes.
SYMPY_CALLABLES = frozenset({
    "Symbol", "Dummy", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality",
    "Unequality", "And", "Or", "Not", "Piecewise", "ITE", "sqrt", "Tuple",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
    "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "OpaqueUnaryFn_sqrt",
    "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor",
})
SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false", "S", "pi", "E", "I"})
SYMPY_ASSUMPTIONS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
                               "zero", "nonzero", "even", "odd", "rational", "extended_real", "commutative"})
GUARD_ATTRIBUTES = frozenset({"size", "stride", "storage_offset", "dim", "isnan", "inf", "ceil", "floor", "sqrt",
                              "trunc", "shape"})
GUARD_NAMES = frozenset({"L", "args", "math", "inf", "True", "False", "None"})
GUARD_CALLABLES = frozenset({"max", "min", "abs", "int", "float", "round", "bool", "len",
                             "cast_symbool_to_symint_guardless"})
GUARD_STRING = re.compile(r"[\w .:\-]*")
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.LShift, ast.RShift,
               ast.BitAnd, ast.BitOr, ast.BitXor)


def _is_symbol_name(name: str) -> bool:
    return name[:1].isalpha() and name.isidentifier() and "__" not in name and not name.startswith("_")


def check_torch_expression(text: str, guard: bool = False) -> None:
    """Raises ValueError unless `text` is a plain symbolic expression: numbers, symbol names,
    arithmetic and comparisons, calls of whitelisted sympy/torch-sympy functions, and (in guards)
    `L['x'].size()[2]`-style input accessors. No attribute outside a short list, no dunder names,
    no statements: what passes cannot import, call or reach anything else."""
    if not isinstance(text, str) or len(text) > 20_000:
        raise ValueError("not a string of reasonable length")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError("not a single expression") from None

    def check(node: ast.AST) -> None:
        if isinstance(node, ast.Expression):
            check(node.body)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, _ARITHMETIC):
            check(node.left)
            check(node.right)
        elif isinstance(node, ast.UnaryOp):
            check(node.operand)
        elif isinstance(node, ast.BoolOp):
            for value in node.values:
                check(value)
        elif isinstance(node, ast.Compare):
            check(node.left)
            for value in node.comparators:
                check(value)
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, bool, str)) and node.value is not None:
                raise ValueError(f"constant {node.value!r}")
            if guard and isinstance(node.value, str) and not GUARD_STRING.fullmatch(node.value):
                raise ValueError(f"string {node.value[:40]!r}")  # torch pastes guards into a quoted message
        elif isinstance(node, ast.Name):
            if not (_is_symbol_name(node.id) or (guard and node.id in GUARD_NAMES)):
                raise ValueError(f"name '{node.id}'")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                if func.id not in SYMPY_CALLABLES and not (guard and func.id in GUARD_CALLABLES):
                    raise ValueError(f"call of '{func.id}'")
            elif guard and isinstance(func, ast.Attribute) and func.attr in GUARD_ATTRIBUTES:
                check(func.value)
            else:
                raise ValueError(f"call of '{ast.unparse(func)}'")
            for arg in node.args:
                check(arg)
            for keyword in node.keywords:
                if keyword.arg not in SYMPY_ASSUMPTIONS or not isinstance(keyword.value, ast.Constant):
                    raise ValueError(f"keyword '{keyword.arg}'")
        elif guard and isinstance(node, ast.Attribute):
            if node.attr not in GUARD_ATTRIBUTES:
                raise ValueError(f"attribute '{node.attr}'")
            check(node.value)
        elif guard and isinstance(node, ast.Subscript):
            check(node.value)
            check(node.slice)
        elif guard and isinstance(node, ast.Tuple):
            for element in node.elts:
                check(element)
        else:
            raise ValueError(f"'{ast.unparse(node)[:60]}'")

    check(tree)


# ----- zip archives ---------------------------------------------------------------------------

def check_zip_members(path: Path, what: str = "archive") -> list[str]:
    """The member names of a zip file, after refusing absolute paths, `..`, backslashes, drive
    letters and symlink entries (any of which could write outside the extraction directory)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeInputError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc}); the file is damaged or "
                               f"not what it claims to be.") from None
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name).parts
        mode = info.external_attr >> 16
        bad = ("an absolute path" if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") else
               "a '..' component" if ".." in parts else
               "a backslash" if "\\" in name else
               "a symlink" if stat.S_ISLNK(mode) else None)
        if bad:
            raise UnsafeInputError(
                f"{path}: {what} member '{name}' has {bad}, so extracting it could write outside its directory "
                f"(zip-slip). The file was crafted or damaged; do not use it, and rebuild it from its source."
            )
    return [info.filename for info in infos]


# ----- torch.export programs without running their code -------------------------------------

class _Refused(Exception):
    """Raised inside torch's loader when the archive asks for something that would run code."""


_LOAD_LOCK = threading.RLock()


class _GuardedSympy(types.ModuleType):
    """sympy, as seen by torch's deserializer: `sympify` only takes whitelisted expressions."""

    def __init__(self, sympy_module: types.ModuleType):
        super().__init__("sympy")
        self._sympy = sympy_module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sympy, name)

    def sympify(self, value, *args, **kwargs):
        if isinstance(value, str):
            try:
                check_torch_expression(value)
            except ValueError as exc:
                raise _Refused(f"a symbolic size '{value[:80]}' that is not a plain expression ({exc})") from None
        return self._sympy.sympify(value, *args, **kwargs)


@contextlib.contextmanager
def _no_code_while_loading() -> Iterator[None]:
    """Within: torch.load is weights-only, pickle/torchbind object loads are refused, sympify is guarded.

    Patches are process-wide for the (short, locked) duration of one load; they only ever
    restrict what another thread's `torch.load` would accept, never widen it."""
    import torch._export.serde.serialize as serialize
    import torch.export.pt2_archive._package as package

    real_load = torch.load
    real_pickle = package.pickle
    real_sympy = serialize.sympy
    real_obj = torch._C._pickle_load_obj

    def weights_only_load(f, *args, weights_only=None, **kwargs):
        kwargs.pop("pickle_module", None)
        if weights_only is False:
            try:
                return real_load(f, *args, weights_only=True, **kwargs)
            except Exception as exc:  # noqa: BLE001 - anything the weights-only unpickler refuses
                found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)", str(exc))
                raise _Refused(f"a pickle that is not plain tensors ({found.group(1) if found else type(exc).__name__})") from None
        return real_load(f, *args, weights_only=True, **kwargs)

    def refuse_pickle(*_args, **_kwargs):
        raise _Refused("a pickled Python object (opaque constant)")

    def refuse_script_object(*_args, **_kwargs):
        raise _Refused("a pickled TorchScript object (custom-class constant)")

    with _LOAD_LOCK:
        torch.load = weights_only_load
        package.pickle = types.SimpleNamespace(loads=refuse_pickle, load=refuse_pickle)
        serialize.sympy = _GuardedSympy(real_sympy)
        torch._C._pickle_load_obj = refuse_script_object
        try:
            yield
        finally:
            torch.load = real_load
            package.pickle = real_pickle
            serialize.sympy = real_sympy
            torch._C._pickle_load_obj = real_obj


def _refusal(path: Path, what: str) -> UnsafeInputError:
    return UnsafeInputError(
        f"{path}: the program holds {what}; loading it would run code from the file, so vdopt refused it. "
        f"Re-export it with torch.export.save from plain tensors, or pass --trust-pickle if you trust the file and "
        f"its author."
    )


def check_guards(ep: torch.export.ExportedProgram, path: Path) -> None:
    """`ExportedProgram.module()` turns the archive's `guards_code` strings into Python and `exec`s it."""
    for guard in getattr(ep, "_guards_code", None) or []:
        try:
            check_torch_expression(guard, guard=True)
        except ValueError as exc:
            raise _refusal(path, f"an input guard '{str(guard)[:80]}' that is not a plain comparison ({exc})") from None


@contextlib.contextmanager
def _checked_guard_functions() -> Iterator[None]:
    """Within: `ExportedProgram.module()` checks the guard code it is about to `exec` (the archive's
    guards plus those torch derives from the archive's inputs, before and after it substitutes the
    input paths) against the guard grammar."""
    import torch.export._unlift as unlift
    from torch.utils import _pytree as pytree

    real = unlift._convert_guards_code_to_fn

    def convert(guards_code, paths_of_placeholders):
        for code in guards_code:
            actual, shadow = code, code
            try:
                for index, path in enumerate(paths_of_placeholders):
                    actual = actual.replace("L" + pytree.keystr(path), f"args[{index}]")
                    shadow = shadow.replace("L" + pytree.keystr(path), path[0].key + pytree.keystr(path[1:]))
                for text in (code, actual, shadow):
                    check_torch_expression(text, guard=True)
            except (ValueError, AttributeError, TypeError) as exc:
                raise _Refused(f"an input guard '{str(code)[:80]}' that is not a plain comparison ({exc})") from None
        return real(guards_code, paths_of_placeholders)

    with _LOAD_LOCK:
        unlift._convert_guards_code_to_fn = convert
        try:
            yield
        finally:
            unlift._convert_guards_code_to_fn = real


def load_exported_program(path: str | Path, *, trust_pickle: bool = False) -> torch.export.ExportedProgram:
    """`torch.export.load` that runs nothing from the file unless `trust_pickle` (see the module doc)."""
    path = Path(path)
    names = check_zip_members(path, "torch.export archive")
    native = next((n for n in names if "data/aotinductor/" in n), None)
    if native is not None and not trust_pickle:  # torch.export.load dlopens an AOTI package's .so
        raise _refusal(path, f"AOTInductor native code ({native})")
    if trust_pickle:
        return torch.export.load(str(path))
    try:
        with _no_code_while_loading():
            ep = torch.export.load(str(path))
    except _Refused as exc:
        raise _refusal(path, str(exc)) from None
    except UnsafeInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch wraps a refusal deep inside in RuntimeError
        cause, seen = exc, set()
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, _Refused):
                raise _refusal(path, str(cause)) from None
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        raise VdoptError(f"{path}: torch.export cannot read it ({first_line(exc)}); the file is damaged or was not "
                         f"written by torch.export.save. Copy it again or re-export it (a bundle: recompile it).") from None
    check_guards(ep, path)
    try:  # build the runnable module once with the generated guard code checked; later .module() calls
        with _checked_guard_functions():  # derive the same code from the same program
            ep.module()
    except _Refused as exc:
        raise _refusal(path, str(exc)) from None
    return ep


# ----- paths a bundle names -------------------------------------------------------------------

def confined_path(root: Path, name: Any, what: str) -> Path:
    """`root / name` after checking that `name` is a relative path inside `root`: no absolute path,
    no `..`, no backslash, and no symlink anywhere on the way (so it cannot resolve elsewhere)."""
    where = f"{root}: {what}"
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafeInputError(f"{where} {name!r} is not a file name; the manifest was edited. Recompile the bundle.")
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("\\") or (len(name) > 1 and name[1] == ":") or ".." in pure.parts \
            or "\\" in name:
        raise UnsafeInputError(
            f"{where} '{name}' points outside the bundle (absolute path, '..' or backslash). A bundle only names its "
            f"own files; the manifest was edited or crafted. Do not use this bundle; recompile it from its recipe."
        )
    current = root
    for part in pure.parts:
        current = current / part
        if current.is_symlink():
            raise UnsafeInputError(
                f"{where} '{name}' goes through the symlink {current.relative_to(root)} -> {os.readlink(current)}. "
                f"A bundle's files must be real files inside it; copy the bundle with symlinks resolved "
                f"(cp -rL) or recompile it."
            )
    return current
