"""vdopt's custom ops (`torch.ops.vdopt.*`): one definition on every backend (ARCHITECTURE contract 6).

Each op has a C++ CPU kernel and a CUDA kernel (`cuda/ops/`), a fake kernel for export, the aten
decomposition below (the reference every other form is tested against, and what `ops: aten` emits),
an ONNX function with the same math (`vdopt.ops.onnx`), and a TensorRT plugin (`cuda/plugins/`).

The native library is built on first use with the compiler that built torch's extensions and cached
under `~/.cache/vdopt/ops` (or `$VDOPT_CACHE/ops`); `pip install -e .` stays a pure-Python install.
A bundle whose program calls these ops ships the library it was compiled with, and opening that
bundle loads it (after its checksum is verified) instead of building one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

from vdopt.bundle import sha256
from vdopt.errors import BundleError, LoweringError

CPU_SOURCES = ("vdopt_ops.cpp",)
CUDA_SOURCES = ("vdopt_ops_cuda.cpp", "cache_ops.cu")  # built in only where torch has CUDA
LIBRARY_NAME = "vdopt_ops"

_loaded: dict[str, str] = {}  # sha256 of the library loaded into this process -> its path


def sources_dir() -> Path:
    import vdopt.cuda

    return Path(vdopt.cuda.__path__[0]) / "ops"


def library_sources() -> list[Path]:
    with_cuda = torch.version.cuda is not None and torch.cuda.is_available()
    return [sources_dir() / name for name in (*CPU_SOURCES, *(CUDA_SOURCES if with_cuda else ()))]


def cache_dir() -> Path:
    root = Path(os.environ.get("VDOPT_CACHE", Path.home() / ".cache" / "vdopt"))
    digest = hashlib.sha256()
    for path in sorted(sources_dir().iterdir()):
        if path.suffix in (".cpp", ".cu", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    key = f"torch{torch.__version__.replace('+', '-')}-{len(library_sources())}src-{digest.hexdigest()[:12]}"
    return root / "ops" / key


def build_library() -> Path:
    """The op library for this torch (CPU kernels, and CUDA kernels where torch has CUDA), built once per source
    version (about 15 s on two cores for the CPU kernels) and cached."""
    from torch.utils import cpp_extension

    directory = cache_dir()
    library = directory / f"{LIBRARY_NAME}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    print(f"vdopt: building the custom-op library once for torch {torch.__version__} (a few seconds) in {directory}",
          file=sys.stderr)
    try:
        cpp_extension.load(name=LIBRARY_NAME, sources=[str(path) for path in library_sources()],
                           build_directory=str(directory), is_python_module=False, verbose=False,
                           extra_include_paths=[str(sources_dir())], extra_cflags=["-O3", "-Wall", "-Wextra"],
                           extra_cuda_cflags=["-O3"])
    except (RuntimeError, OSError, FileNotFoundError) as exc:
        raise LoweringError(f"the vdopt custom-op library could not be built ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}). It needs a C++ "
                            f"compiler (g++) and ninja; or compile without vdopt's ops (insert_cache `ops: aten`, no "
                            f"fuse_norm_modulate).") from None
    return library


def kernel_library() -> Path:
    """The CUDA kernels alone (cuda/ops/cache_ops.cu) as a shared library, for callers without torch's dispatcher
    (the TensorRT plugins, the C++ runtime): built once with nvcc and cached."""
    from vdopt.cuda.check_kernels import find_nvcc

    library = cache_dir() / "libvdopt_kernels.so"
    if library.exists():
        return library
    nvcc = find_nvcc()
    if nvcc is None:
        raise LoweringError("the vdopt CUDA kernels need nvcc to build (PATH or $CUDA_HOME/bin).")
    library.parent.mkdir(parents=True, exist_ok=True)
    staging = library.with_suffix(f".{os.getpid()}.so")
    result = subprocess.run([nvcc, "-shared", "-O3", "-Xcompiler", "-fPIC", "-I", str(sources_dir()),
                             str(sources_dir() / "cache_ops.cu"), "-o", str(staging)], capture_output=True, text=True)
    if result.returncode != 0:
        raise LoweringError(f"nvcc could not build the vdopt CUDA kernels: {result.stderr.strip()[-2000:]}")
    staging.replace(library)
    return library


def library_path() -> Path:
    """The op library loaded into this process, building and loading it if none is."""
    if not _loaded:
        load_library(build_library())
    return Path(next(iter(_loaded.values())))


def custom_ops(ep: torch.export.ExportedProgram) -> list[str]:
    """The vdopt ops a program calls, `torch.cond` branches included ('vdopt::cache_decision', ...)."""
    return sorted({node.target.name() for module in ep.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
                   for node in module.graph.nodes
                   if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "vdopt"})


def load_library(path: Path) -> None:
    """Loads an op library into this process once. A second, different library cannot replace the first
    (the dispatcher keeps one kernel per op): that is an error naming both."""
    path = Path(path)
    sha = sha256(path)
    if sha in _loaded:
        return
    if _loaded:
        raise BundleError(f"{path}: a different vdopt op library ({next(iter(_loaded.values()))}) is already loaded in "
                          f"this process, and torch keeps one kernel per op. Open this bundle in a new process, or "
                          f"recompile it with this vdopt.")
    torch.ops.load_library(str(path))
    from vdopt.ops import fakes  # noqa: F401 - registers the fake kernels
    _loaded[sha] = str(path)
