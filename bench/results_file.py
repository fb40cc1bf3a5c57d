"""Writing a bench's results file: the record, the command that made it and the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch


def write_results(path: str | Path, record: dict, load_start: tuple, load_end: tuple) -> None:
    """`record` with the command line and the machine (load average at the start and end), as JSON at `path`."""
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), **record,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "load_average_start": load_start, "load_average_end": load_end}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
