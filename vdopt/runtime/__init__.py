"""Running bundles: `Session` (Python). The C++ runtime lives in `cuda/`."""

from vdopt.runtime.session import Session

__all__ = ["Session"]
