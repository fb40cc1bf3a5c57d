"""Compiles every CUDA source under cuda/ with nvcc for each target architecture and prints each kernel's
register use and spills. Exits non-zero when a source does not compile or a kernel spills: CI runs it
(`python -m vdopt.cuda.check_kernels`) on a machine without a GPU, where nvcc still compiles."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = ("sm_80", "sm_90")
ROOT = Path(__file__).resolve().parent
FUNCTION = re.compile(r"ptxas info\s*: Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
SPILLS = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")
REGISTERS = re.compile(r"ptxas info\s*: Used (?P<registers>\d+) registers")


@dataclass
class KernelUsage:
    source: str
    arch: str
    kernel: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0


def find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")  # device names are Itanium-mangled
    if tool is None:
        return names
    result = subprocess.run([tool, "--no-params"] if tool.endswith("/c++filt") else [tool], input="\n".join(names),
                            capture_output=True, text=True)
    lines = [line.replace("(anonymous namespace)::", "") for line in result.stdout.splitlines()]
    return lines if result.returncode == 0 and len(lines) == len(names) else names


def parse_usage(log: str, source: str) -> list[KernelUsage]:
    kernels: list[KernelUsage] = []
    for line in log.splitlines():
        if match := FUNCTION.search(line):
            kernels.append(KernelUsage(source, match["arch"], match["name"]))
        elif kernels and (match := SPILLS.search(line)):
            kernels[-1].stack, kernels[-1].spill_stores, kernels[-1].spill_loads = (
                int(match["stack"]), int(match["stores"]), int(match["loads"]))
        elif kernels and (match := REGISTERS.search(line)):
            kernels[-1].registers = int(match["registers"])
    return kernels


def compile_source(nvcc: str, source: Path, arch: str, output_dir: Path) -> tuple[bool, str]:
    command = [nvcc, "-c", "-O3", f"-arch={arch}", "--resource-usage", "-Xptxas", "-warn-spills",
               "-Werror", "all-warnings", "-I", str(source.parent), str(source), "-o", str(output_dir / f"{source.stem}.{arch}.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    return result.returncode == 0, result.stdout + result.stderr


def check_kernels(architectures=ARCHITECTURES, root: Path = ROOT, out=sys.stdout) -> list[KernelUsage]:
    """Compiles and reports; raises RuntimeError naming every failure (a compile error or a spilling kernel)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc was not found (PATH or $CUDA_HOME/bin): the CUDA kernels cannot be compiled here.")
    failures, usage = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for source in sorted(root.rglob("*.cu")):
            name = source.relative_to(root).as_posix()
            for arch in architectures:
                ok, log = compile_source(nvcc, source, arch, Path(scratch))
                if not ok:
                    failures.append(f"{name} ({arch}) does not compile:\n{log.strip()}")
                    continue
                kernels = parse_usage(log, name)
                for kernel, readable in zip(kernels, demangle([k.kernel for k in kernels])):
                    kernel.kernel = readable
                usage += kernels
    print(f"{'source':<22} {'arch':<6} {'regs':>4} {'spill st':>8} {'spill ld':>8} {'stack':>5}  kernel", file=out)
    for k in usage:
        print(f"{k.source:<22} {k.arch:<6} {k.registers:>4} {k.spill_stores:>8} {k.spill_loads:>8} {k.stack:>5}  {k.kernel}", file=out)
    failures += [f"{k.source} ({k.arch}): {k.kernel} spills ({k.spill_stores} bytes stored, {k.spill_loads} loaded)"
                 for k in usage if k.spill_stores or k.spill_loads]
    if failures:
        raise RuntimeError("\n".join(failures))
    return usage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help=f"target architecture (default: {', '.join(ARCHITECTURES)})")
    args = parser.parse_args(argv)
    try:
        usage = check_kernels(tuple(args.arch or ARCHITECTURES))
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"check_kernels: {exc}", file=sys.stderr)
        return 1
    print(f"check_kernels: {len(usage)} kernel builds, none spills.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
