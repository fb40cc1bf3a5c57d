"""The bundle: a directory with `manifest.json`, the lowered step segments and checksums.

It is written into a temporary sibling directory and renamed into place (contract 7), so an
interrupted or failed compile leaves nothing half-made; every file is checksummed and verified
when the bundle is opened, so a truncated copy or an edited file is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from vdopt.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("schema_version", "family", "inputs", "outputs", "state", "step_table", "segments", "checksums")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def staged_bundle(destination: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yields a temporary directory; on success it replaces `destination`, on failure it vanishes."""
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise BundleError(f"{destination}: already exists; pass --force to replace it.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    try:
        yield staging
        if destination.exists():
            retired = staging.with_suffix(".retired")
            destination.rename(retired)
            staging.rename(destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    files = sorted(p for p in bundle_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"schema_version": SCHEMA_VERSION, **manifest,
                "checksums": {str(p.relative_to(bundle_dir)): sha256(p) for p in files}}
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
    return manifest


def read_manifest(bundle_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: not a vdopt bundle (no {MANIFEST}); `vdopt compile` writes one.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: the manifest is damaged ({exc}); recompile the bundle.") from None
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise BundleError(f"{path}: the manifest lacks {', '.join(missing)}; it was edited or truncated. Recompile the bundle.")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise BundleError(f"{path}: manifest schema {manifest['schema_version']}, this vdopt reads {SCHEMA_VERSION}; recompile.")
    if verify:
        verify_checksums(bundle_dir, manifest)
    return manifest


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
