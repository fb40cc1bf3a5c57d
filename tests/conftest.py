import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def share_the_cores() -> None:
    """Under pytest-xdist each worker takes its share of the cores, for torch and for the subprocesses it starts
    (OpenMP threads spinning on a core another worker needs slow both down)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


share_the_cores()


@pytest.fixture(scope="module")
def wan_checkpoint(tmp_path_factory) -> Path:
    """The tiny Wan config's random weights as a safetensors file."""
    from safetensors.torch import save_file

    from vdopt.families import descriptor_for

    descriptor = descriptor_for("wan")
    model = descriptor.build(dict(descriptor.tiny_config))
    path = tmp_path_factory.mktemp("wan") / "wan.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
