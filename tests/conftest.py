import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


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
