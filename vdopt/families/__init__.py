"""Per-family architecture descriptors (see `base.py`). Importing this package registers them."""

from vdopt.errors import CaptureError
from vdopt.families import cogvideox, hunyuan_video, latte, ltx_video, reference, wan  # noqa: F401  (registers)
from vdopt.families.base import ArchitectureDescriptor, registry


def descriptor_for(family: str) -> ArchitectureDescriptor:
    try:
        return registry()[family]
    except KeyError:
        raise CaptureError(f"model.family '{family}' is not known; known families: {', '.join(sorted(registry()))}.") from None
