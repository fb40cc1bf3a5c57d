"""The bundle: a directory with `manifest.json`, the lowered step segments and checksums.

It is written into a temporary sibling directory and swapped into place (contract 7): a failed or
killed compile leaves the old bundle (or nothing) at the path, never half of one, and its staging
debris is cleaned by the next compile. Only bundles are ever replaced, and only when asked
(`--force`); an ordinary file or directory at the path is never touched.

Trust model: a bundle holds native code (AOTI `.so` inside packages, op libraries), so opening
one checks, before anything is loaded, that `manifest.json` matches `manifest.sha256` beside
it, that every path the manifest names is a relative path confined to the bundle (no absolute
path, `..` or symlink), that every named file is listed in `checksums` and every file in the
bundle is, that each file matches its checksum, and that every shape is an expression of the
small size grammar (`vdopt.safety`). A checksum catches edits and damage; it is not a signature:
whoever can rewrite every file can rewrite `manifest.sha256` too.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from vdopt.errors import BundleError
from vdopt.safety import UnsafeInputError, confined_path, shape_expression

SCHEMA_VERSION = 3  # 2: the batch is a step dim (latent.batch and segment dims are [min, max] ranges); 3: stages
READABLE_SCHEMAS = (2, 3)  # a version 2 manifest is a version 3 one without stages
STAGE_KINDS = ("loop", "call")
SHARED_KEYS = ("schema_version", "family", "checksums")  # what a stage's view takes from the top level
MANIFEST = "manifest.json"
MANIFEST_CHECKSUM = "manifest.sha256"
REQUIRED_KEYS = ("schema_version", "family", "inputs", "outputs", "state", "step_table", "segments", "checksums")
MAX_MANIFEST_BYTES = 64 << 20
SHAPE_NAMES = frozenset({"batch", "frames", "height", "width", "frames_units", "height_units", "width_units"})
HEX64 = re.compile(r"[0-9a-f]{64}")
SPLIT_PARTS = ("head", "compute", "reuse", "tail")
SIZE_KEYS = ("frames", "height", "width")
MAX_TENSOR_ELEMENTS = 1 << 32  # per tensor at the default sizes (16 GiB of float32): beyond any step program's


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----- writing ------------------------------------------------------------------------------

def is_bundle(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / MANIFEST).is_file()


def check_destination(destination: Path, overwrite: bool) -> None:
    """Refuses, before any work, to write over anything but a bundle (and a bundle only with force)."""
    try:
        os.lstat(destination)
    except FileNotFoundError:
        pass
    except OSError as exc:  # a name too long for the file system, a file where a parent directory goes
        raise BundleError(f"{destination}: cannot be a bundle path ({exc.strerror or exc}); choose another -o path.") from None
    if destination.is_symlink():
        raise BundleError(f"{destination}: is a symlink; vdopt will not replace it. Give the real path of a new or "
                          f"existing bundle directory.")
    if not destination.exists():
        return
    if destination.is_dir() and not any(destination.iterdir()):
        return  # an empty directory holds nothing of the user's
    if not destination.is_dir():
        raise BundleError(f"{destination}: is an existing file, not a bundle directory; vdopt never replaces it. "
                          f"Choose another -o path (e.g. {destination.name}.vdopt) or remove the file yourself.")
    if not is_bundle(destination):
        raise BundleError(f"{destination}: is an existing directory that is not a vdopt bundle (no {MANIFEST}); vdopt "
                          f"never deletes its contents. Choose another -o path, or empty or remove it yourself.")
    if not overwrite:
        raise BundleError(f"{destination}: a bundle already exists there; pass --force to replace it (the old bundle "
                          f"stays in place until the new one is complete), or choose another -o path.")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(destination: Path) -> None:
    """Removes what killed compiles of `destination` left behind: staging directories of processes that
    no longer run, and a retired old bundle (restored if the kill came before the new one was in place)."""
    pattern = re.compile(rf"\.{re.escape(destination.name)}\.(\d+)\.[^.]+\.(partial|retired)")
    if not destination.parent.is_dir():
        return
    for entry in destination.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir() or _pid_alive(int(match.group(1))):
            continue
        if match.group(2) == "retired" and not os.path.lexists(destination) and is_bundle(entry):
            os.rename(entry, destination)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_bundle(staging: Path, destination: Path) -> None:
    """Puts the finished `staging` at `destination`. At every instant the path holds the old bundle or
    the new one: an atomic exchange where the OS has one, else two renames whose in-between state
    (old bundle renamed `.retired`, nothing at the path) `clean_stale` repairs at the next compile."""
    if not os.path.lexists(destination):
        os.rename(staging, destination)
        return
    if destination.is_dir() and not any(destination.iterdir()):
        os.rmdir(destination)
        os.rename(staging, destination)
        return
    if _exchange(staging, destination):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old bundle
        return
    retired = staging.with_name(staging.name.removesuffix(".partial") + ".retired")
    os.rename(destination, retired)
    os.rename(staging, destination)
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def staged_bundle(destination: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yields a temporary directory; on success it replaces `destination`, on failure it vanishes.

    `destination` is checked first (`check_destination`), so a refused path costs no compile time."""
    destination = Path(destination)
    check_destination(destination, overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(destination)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.{os.getpid()}.", suffix=".partial",
                                    dir=destination.parent))
    try:
        yield staging
        check_destination(destination, overwrite)  # the path may have changed during a long compile
        replace_bundle(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Writes `manifest.json` with the checksums of every file in the bundle, and its own checksum
    in `manifest.sha256`; refuses a manifest that names a file outside or missing from the bundle."""
    files = sorted(p for p in bundle_dir.rglob("*") if p.is_file() and p.relative_to(bundle_dir).as_posix()
                   not in (MANIFEST, MANIFEST_CHECKSUM))
    manifest = {"schema_version": SCHEMA_VERSION, **manifest,
                "checksums": {p.relative_to(bundle_dir).as_posix(): sha256(p) for p in files}}
    check_paths(bundle_dir, manifest)
    text = json.dumps(manifest, indent=2, sort_keys=False).encode()
    (bundle_dir / MANIFEST).write_bytes(text)
    (bundle_dir / MANIFEST_CHECKSUM).write_text(f"{hashlib.sha256(text).hexdigest()}  {MANIFEST}\n")
    return manifest


# ----- reading ------------------------------------------------------------------------------

def stage_views(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each stage of a staged manifest as a manifest of its own (the top level's family and checksums, the stage's
    step program), so every check of a one-stage manifest applies to each stage unchanged."""
    stages = manifest.get("stages")
    for s, stage in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(stage, dict):
            yield f"stages[{s}]", {**{k: manifest[k] for k in SHARED_KEYS if k in manifest}, **stage}


def named_files(manifest: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every file the manifest names, as (where it is named, name)."""
    for where, view in stage_views(manifest):
        for inner, name in named_files({"segments": view.get("segments")}):
            yield f"{where}.{inner}", name
    for i, segment in enumerate(manifest.get("segments") or []):
        if not isinstance(segment, dict):
            continue
        for name in segment.get("files") or []:
            yield f"segments[{i}].files", name
        for j, part in enumerate(segment.get("parts") or []):
            if isinstance(part, dict):
                for name in part.get("files") or []:
                    yield f"segments[{i}].parts[{j}].files", name
    encoder = manifest.get("prompt_encoder")
    if isinstance(encoder, dict) and encoder.get("file") is not None:
        yield "prompt_encoder.file", encoder["file"]
    for k, library in enumerate(manifest.get("op_libraries") or []):
        if isinstance(library, dict):
            yield f"op_libraries[{k}].file", library.get("file")
    extras = manifest.get("extras")
    items = extras.items() if isinstance(extras, dict) else enumerate(extras) if isinstance(extras, list) else ()
    for key, value in items:
        name = value.get("file") if isinstance(value, dict) else value
        if name is not None:
            yield f"extras[{key!r}]", name


def tensor_specs(manifest: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for key in ("inputs", "outputs", "state"):
        for i, spec in enumerate(manifest.get(key) or []):
            yield f"{key}[{i}]", spec
    for i, segment in enumerate(manifest.get("segments") or []):
        for key in ("inputs", "state"):
            for k, spec in enumerate((segment.get(key) or []) if isinstance(segment, dict) else []):
                yield f"segments[{i}].{key}[{k}]", spec
        for j, part in enumerate((segment.get("parts") or []) if isinstance(segment, dict) else []):
            for key in ("inputs", "outputs"):
                for k, spec in enumerate(part.get(key) or [] if isinstance(part, dict) else []):
                    yield f"segments[{i}].parts[{j}].{key}[{k}]", spec


def check_shapes(path: Path, manifest: dict[str, Any]) -> None:
    """Every size in the manifest is an int or an expression of the size grammar."""
    for where, spec in tensor_specs(manifest):
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list):
            raise BundleError(f"{path}: {where} has no shape list; the manifest was edited. Recompile the bundle.")
        for size in shape:
            if type(size) is int:
                continue
            try:
                shape_expression(size, SHAPE_NAMES)
            except ValueError as exc:
                raise UnsafeInputError(
                    f"{path}: {where}.shape entry {str(size)[:80]!r} is not a size expression: {exc}. Sizes are ints "
                    f"or expressions of the latent dims in a small grammar, never code; the manifest was edited or "
                    f"crafted. Recompile the bundle."
                ) from None


def check_paths(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """Every checksum name and every named file is confined to the bundle; every named file is checksummed."""
    checksums = manifest.get("checksums")
    if not isinstance(checksums, dict) or not all(isinstance(v, str) and HEX64.fullmatch(v) for v in checksums.values()):
        raise BundleError(f"{bundle_dir}: the manifest's checksums are not a map of file names to sha256 digests; it was "
                          f"edited. Recompile the bundle.")
    for name in checksums:
        confined_path(bundle_dir, name, "the manifest's checksum name")
        if name in (MANIFEST, MANIFEST_CHECKSUM):
            raise BundleError(f"{bundle_dir}: the manifest lists {name} among its checksums; it was edited. Recompile.")
    for where, name in named_files(manifest):
        confined_path(bundle_dir, name, f"the manifest's {where}")
        if name not in checksums:
            raise UnsafeInputError(
                f"{bundle_dir}: {where} names '{name}', which has no entry in the manifest's checksums, so it cannot "
                f"be verified and will not be loaded. The manifest was edited; recompile the bundle."
            )


def _read_regular(path: Path, what: str, bundle_dir: Path) -> bytes:
    if path.is_symlink() or not path.is_file():
        raise BundleError(f"{bundle_dir}: {what} is {'a symlink' if path.is_symlink() else 'missing'}; "
                          f"{'a bundle holds real files' if path.is_symlink() else 'the bundle is incomplete or was written by an older vdopt'}. "
                          f"Copy it again (cp -rL) or recompile it.")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{bundle_dir}: {what} is {path.stat().st_size} bytes, far beyond any manifest; refused. Recompile.")
    return path.read_bytes()


def read_manifest(bundle_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a verified bundle. Nothing here loads code; see the module doc for the checks.
    `verify=False` skips only hashing the files' contents (paths, shapes and the manifest's own
    checksum are always checked)."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    try:
        found = bundle_dir.is_dir() and (path.is_file() or path.is_symlink())
    except OSError as exc:  # a name the file system cannot hold (too long), a symlink loop
        raise BundleError(f"{bundle_dir}: not a vdopt bundle ({exc.strerror or exc}).") from None
    if not found:
        raise BundleError(f"{bundle_dir}: not a vdopt bundle (no {MANIFEST}); `vdopt compile` writes one.")
    raw = _read_regular(path, MANIFEST, bundle_dir)
    recorded = _read_regular(bundle_dir / MANIFEST_CHECKSUM, MANIFEST_CHECKSUM, bundle_dir).decode("ascii", "replace").split()
    if not recorded or recorded[0] != hashlib.sha256(raw).hexdigest():
        raise BundleError(
            f"{path}: does not match its checksum in {MANIFEST_CHECKSUM}: the manifest was edited or damaged after the "
            f"bundle was written, so none of its files are trusted or loaded. Copy the bundle again or recompile it."
        )
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: the manifest is damaged ({type(exc).__name__}); recompile the bundle.") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: the manifest is not a JSON object; recompile the bundle.")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise BundleError(f"{path}: the manifest lacks {', '.join(missing)}; it was edited or truncated. Recompile the bundle.")
    if type(manifest["schema_version"]) is not int or manifest["schema_version"] not in READABLE_SCHEMAS:
        raise BundleError(f"{path}: manifest schema {manifest['schema_version']}, this vdopt reads "
                          f"{' and '.join(map(str, READABLE_SCHEMAS))}; recompile.")
    check_stages(path, manifest)
    for where, view in [("", manifest), *stage_views(manifest)]:
        if not isinstance(view.get("segments"), list) or not all(isinstance(s, dict) for s in view["segments"]):
            raise BundleError(f"{path}: the manifest's {where + '.' if where else ''}segments are not a list of objects; it was "
                              f"edited. Recompile the bundle.")
        check_schema(path, view)
        check_paths(bundle_dir, view)
        check_shapes(bundle_dir, view)
        check_consistency(path, view)
    check_unlisted(bundle_dir, manifest)
    if verify:
        verify_checksums(bundle_dir, manifest)
    return manifest


def check_stages(path: Path, manifest: dict[str, Any]) -> None:
    """A staged manifest (schema 3): stages are objects with a name, a kind, an output name, feeds from earlier
    stages' outputs and a noise offset; loop stages say what running them needs."""
    if "stages" not in manifest:
        return
    stages, problems, outputs = manifest["stages"], [], set()
    if manifest["schema_version"] < 3 or not isinstance(stages, list) or not stages:
        problems.append("stages should be a non-empty list (schema 3)")
        stages = []
    for s, stage in enumerate(stages):
        here = f"stages[{s}]"
        if not isinstance(stage, dict):
            problems.append(f"{here} should be an object")
            continue
        kind, feeds, output = stage.get("kind"), stage.get("feeds"), stage.get("output")
        if not (isinstance(kind, str) and kind in STAGE_KINDS):
            problems.append(f"{here}.kind should be one of {', '.join(STAGE_KINDS)}")
        if not isinstance(stage.get("name"), str) or not isinstance(output, str):
            problems.append(f"{here}.name and .output should be strings")
        if not (isinstance(feeds, dict) and all(isinstance(k, str) and isinstance(v, str) and v in outputs for k, v in feeds.items())):
            problems.append(f"{here}.feeds should map input names to earlier stages' outputs ({', '.join(sorted(outputs)) or 'none'})")
        if not (type(stage.get("noise_offset", 0)) is int and 0 <= stage.get("noise_offset", 0) < 2**40):
            problems.append(f"{here}.noise_offset should be a non-negative int")
        if kind == "loop":
            problems += [f"{here} lacks {key}, which running a loop stage needs" for key in ("latent", "num_steps", "guidance")
                         if key not in stage]
            sampler = stage.get("sampler")
            if not (isinstance(sampler, dict) and type(sampler.get("guidance_scale")) in (int, float)):
                problems.append(f"{here}.sampler.guidance_scale should be a number")
        outputs.add(output if isinstance(output, str) else "")
    if problems:
        raise BundleError(f"{path}: the manifest's stages do not have the form this vdopt reads: {'; '.join(problems[:3])}. "
                          f"It was edited or written by another version; recompile the bundle.")


def check_schema(path: Path, manifest: dict[str, Any]) -> None:
    """The fields the runtime reads have the types it expects (extra keys are allowed), so an edited
    manifest is a one-paragraph error here rather than a KeyError or TypeError deep in a run."""
    from vdopt.families.base import NULL_FILLS
    from vdopt.program import DTYPES, STEP_DIMS

    problems: list[str] = []

    def expect(ok: bool, where: str, what: str) -> bool:
        if not ok:
            problems.append(f"{where} should be {what}")
        return ok

    def is_int(value: Any, low: int = 0) -> bool:
        return type(value) is int and value >= low

    def one_of(value: Any, names: Any) -> bool:
        return isinstance(value, str) and value in names  # an edited value may be a list or object (unhashable)

    def tensor_list(specs: Any, where: str, state: bool = False) -> None:
        if expect(isinstance(specs, list), where, "a list"):
            for i, spec in enumerate(specs):
                here = f"{where}[{i}]"
                if expect(isinstance(spec, dict), here, "an object"):
                    expect(isinstance(spec.get("name"), str), f"{here}.name", "a string")
                    expect(one_of(spec.get("dtype"), DTYPES), f"{here}.dtype", f"one of {', '.join(DTYPES)}")
                    if state:
                        expect(one_of(spec.get("init", "zeros"), ("zeros", "ones")), f"{here}.init", "zeros or ones")

    for key in ("inputs", "outputs"):
        tensor_list(manifest.get(key), key)
    tensor_list(manifest.get("state"), "state", state=True)
    expect(isinstance(manifest.get("family"), str), "family", "a string")
    rules = manifest.get("null_cond", {})
    expect(isinstance(rules, dict) and all(one_of(rule, NULL_FILLS) for rule in rules.values()), "null_cond",
           f"conditioning names mapped to one of {', '.join(NULL_FILLS)}")
    latent = manifest.get("latent")
    if "latent" in manifest and expect(isinstance(latent, dict), "latent", "an object"):
        batch = latent.get("batch")
        expect(isinstance(batch, list) and len(batch) == 2 and all(is_int(b, 1) for b in batch) and batch[0] <= batch[1],
               "latent.batch", "a [min, max] range of positive ints")
        expect(is_int(latent.get("channels"), 1), "latent.channels", "a positive int")
        expect(one_of(latent.get("dtype"), DTYPES), "latent.dtype", f"one of {', '.join(DTYPES)}")
        multiples = latent.get("multiples")
        expect(isinstance(multiples, list) and len(multiples) == 3 and all(is_int(m, 1) for m in multiples),
               "latent.multiples", "three positive ints")
        sizes = latent.get("default_sizes")
        expect(isinstance(sizes, dict) and all(is_int(sizes.get(k), 1) for k in ("frames", "height", "width")),
               "latent.default_sizes", "positive ints for frames, height and width")
    if "num_steps" in manifest:
        expect(is_int(manifest["num_steps"], 1), "num_steps", "a positive int")
    expect(isinstance(manifest["step_table"], dict), "step_table", "an object")
    if "guidance" in manifest:
        expect(isinstance(manifest["guidance"], bool), "guidance", "true or false")
    libraries = manifest.get("op_libraries", [])
    if expect(isinstance(libraries, list), "op_libraries", "a list"):
        for k, library in enumerate(libraries):
            expect(isinstance(library, dict) and isinstance(library.get("file"), str)
                   and isinstance(library.get("ops"), list) and all(isinstance(op, str) for op in library["ops"]),
                   f"op_libraries[{k}]", "an object with a file name and the list of ops it defines")
    for i, segment in enumerate(manifest["segments"]):
        here = f"segments[{i}]"
        expect(isinstance(segment.get("name"), str), f"{here}.name", "a string")
        expect(isinstance(segment.get("backend"), str), f"{here}.backend", "a string")
        files = segment.get("files", [])
        expect(isinstance(files, list) and all(isinstance(f, str) for f in files), f"{here}.files", "a list of file names")
        dims = segment.get("dims")
        expect(isinstance(dims, dict) and all(k in STEP_DIMS and isinstance(v, list) and len(v) == 2
                                              and all(is_int(x, 1) for x in v) and v[0] <= v[1] for k, v in dims.items()),
               f"{here}.dims", "step dim names (batch, frames, height, width) mapped to [min, max] positive ints")
        if "inputs" in segment:
            tensor_list(segment["inputs"], f"{here}.inputs")
        if "state" in segment:
            tensor_list(segment["state"], f"{here}.state", state=True)
        kind = segment.get("kind", "step")
        if not expect(kind in ("step", "split") if isinstance(kind, str) else False, f"{here}.kind", "step or split"):
            continue
        if kind == "step":
            expect(isinstance(files, list) and len(files) > 0, f"{here}.files", "at least one file")
            continue
        parts = segment.get("parts")
        expect(isinstance(segment.get("flag"), str), f"{here}.flag", "the name of the value that picks the branch")
        expect(isinstance(parts, list) and all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in parts)
               and sorted(p["name"] for p in parts) == sorted(SPLIT_PARTS),
               f"{here}.parts", f"the parts {', '.join(SPLIT_PARTS)}")
        for j, part in enumerate(parts if isinstance(parts, list) else []):
            if expect(isinstance(part, dict), f"{here}.parts[{j}]", "an object"):
                pfiles = part.get("files", [])
                expect(isinstance(pfiles, list) and len(pfiles) > 0 and all(isinstance(f, str) for f in pfiles),
                       f"{here}.parts[{j}].files", "a list of file names")
                tensor_list(part.get("inputs", []), f"{here}.parts[{j}].inputs")
                tensor_list(part.get("outputs", []), f"{here}.parts[{j}].outputs")
    if problems:
        raise BundleError(f"{path}: the manifest does not have the form this vdopt reads: {'; '.join(problems[:3])}"
                          f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. It was edited or written "
                          f"by another version; recompile the bundle.")


def check_consistency(path: Path, manifest: dict[str, Any]) -> None:
    """Fields that must agree with each other and with what the program was compiled for (after
    `check_schema` and `check_shapes`): an edit of one of them is refused here, rather than failing
    inside the step program or allocating whatever sizes the edit names."""
    from vdopt.program import resolve_size

    problems: list[str] = []
    inputs = manifest["inputs"]
    timesteps = manifest["step_table"].get("timesteps")
    if "num_steps" in manifest and isinstance(timesteps, list) and manifest["num_steps"] != len(timesteps):
        problems.append(f"num_steps is {manifest['num_steps']} but the step table holds {len(timesteps)} timesteps")
    if "guidance" in manifest and manifest["guidance"] != any(s["name"].startswith("uncond.") for s in inputs):
        problems.append(f"guidance is {str(manifest['guidance']).lower()} but the inputs "
                        f"{'have no' if manifest['guidance'] else 'have'} uncond.* tensors")
    conds = sorted(s["name"].removeprefix("cond.") for s in inputs if s["name"].startswith("cond."))
    if "null_cond" in manifest and sorted(manifest["null_cond"]) != conds:
        problems.append(f"null_cond names {sorted(manifest['null_cond'])} but the conditioning inputs are {conds}")
    for i, segment in enumerate(manifest["segments"]):
        for key in ("inputs", "state"):
            if key in segment and [(s["name"], s["dtype"]) for s in segment[key]] != [(s["name"], s["dtype"]) for s in manifest[key]]:
                problems.append(f"segments[{i}].{key} names other tensors (or dtypes) than the manifest's {key}")
    latent = manifest.get("latent")
    if latent is not None:
        x = inputs[0] if inputs else {"shape": []}
        if x.get("name") != "x" or len(x["shape"]) != 5:
            problems.append("inputs[0] should be the latent x, shaped [batch, channels, frames, height, width]")
        else:
            low, high = latent["batch"]
            if type(x["shape"][0]) is int and not low <= x["shape"][0] <= high:
                problems.append(f"latent.batch is {latent['batch']} but inputs[0] (x) has batch {x['shape'][0]}")
            if type(x["shape"][1]) is int and x["shape"][1] != latent["channels"]:
                problems.append(f"latent.channels is {latent['channels']} but inputs[0] (x) has {x['shape'][1]}")
            for key, size in zip(SIZE_KEYS, x["shape"][2:]):
                if type(size) is int and size != latent["default_sizes"][key]:
                    problems.append(f"latent.default_sizes.{key} is {latent['default_sizes'][key]} but inputs[0] (x) has {size}")
            if x["dtype"] != latent["dtype"]:
                problems.append(f"latent.dtype is {latent['dtype']} but inputs[0] (x) is {x['dtype']}")
        sizes = {"batch": latent["batch"][0], **{k: latent["default_sizes"][k] for k in SIZE_KEYS}}
        for where, spec in [("latent", {"shape": list(sizes.values())}), *tensor_specs(manifest)]:
            try:
                dims = [resolve_size(d, sizes, latent["multiples"]) for d in spec["shape"]]
            except ValueError as exc:
                problems.append(f"{where}.shape: {exc}")
                continue
            elements = 1
            for d in dims:
                elements *= max(d, 0)
            if any(d < 0 for d in dims) or elements > MAX_TENSOR_ELEMENTS:
                problems.append(f"{where}.shape is {dims} at the default sizes (the smallest batch), "
                                f"{'a negative size' if any(d < 0 for d in dims) else 'far beyond any step tensor'}")
    if problems:
        raise BundleError(f"{path}: the manifest contradicts itself: {'; '.join(problems[:3])}"
                          f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. It was edited after the "
                          f"bundle was written; recompile the bundle.")


def check_unlisted(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """No file or symlink in the bundle that its checksums do not list."""
    listed = set(manifest["checksums"]) | {MANIFEST, MANIFEST_CHECKSUM}
    for entry in sorted(bundle_dir.rglob("*")):
        name = entry.relative_to(bundle_dir).as_posix()
        if entry.is_symlink():
            raise UnsafeInputError(f"{bundle_dir}: {name} is a symlink (-> {os.readlink(entry)}); a bundle holds only "
                                   f"its own real files. Copy it with symlinks resolved (cp -rL) or recompile it.")
        if entry.is_file() and name not in listed:
            raise UnsafeInputError(f"{bundle_dir}: {name} is in the bundle but not in its manifest's checksums, so it was "
                                   f"added after the bundle was written. Remove it, or recompile the bundle.")


def verify_checksums(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    bad = []
    for name, expected in manifest["checksums"].items():
        path = bundle_dir / name
        if not path.is_file():
            bad.append(f"{name} is missing")
        elif sha256(path) != expected:
            bad.append(f"{name} does not match its checksum")
    if bad:
        raise BundleError(
            f"{bundle_dir}: checksum error: {'; '.join(bad[:3])}. The bundle was truncated or edited after it was "
            f"written; copy it again or recompile it."
        )


def bundle_file(bundle_dir: str | Path, name: str, manifest: dict[str, Any]) -> Path:
    """The path of a file the (verified) manifest names, re-checked: confined and checksummed."""
    bundle_dir = Path(bundle_dir)
    if name not in manifest["checksums"]:
        raise UnsafeInputError(f"{bundle_dir}: '{name}' has no checksum in the manifest; it will not be loaded. Recompile.")
    return confined_path(bundle_dir, name, "the manifest's file")


def check_onnx_external_data(bundle_dir: str | Path, name: str, manifest: dict[str, Any]) -> None:
    """An ONNX file's external tensor data must be checksummed files of the bundle, not paths elsewhere."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    bundle_dir = Path(bundle_dir)
    try:
        model = onnx.load(str(bundle_file(bundle_dir, name, manifest)), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types on damaged input
        raise BundleError(f"{bundle_dir}: {name} is not a readable ONNX model ({type(exc).__name__}); recompile the bundle.") from None
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        target = location if PurePosixPath(location).is_absolute() else (PurePosixPath(name).parent / location).as_posix()
        confined_path(bundle_dir, target, f"{name}'s external data of tensor '{tensor.name}',")
        if target not in manifest["checksums"]:
            raise UnsafeInputError(f"{bundle_dir}: {name} reads tensor '{tensor.name}' from '{location}', which is not a "
                                   f"checksummed file of the bundle. The model was edited; recompile the bundle.")
