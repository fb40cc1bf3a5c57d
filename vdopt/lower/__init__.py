"""Backends, by name. TensorRT is imported lazily: its libraries exist only on GPU machines."""

from vdopt.errors import LoweringError
from vdopt.lower.aoti import AotiBackend
from vdopt.lower.base import Backend
from vdopt.lower.onnx_backend import OnnxBackend
from vdopt.lower.torch_backend import TorchBackend

BACKENDS = {"torch": TorchBackend, "aoti": AotiBackend, "onnx": OnnxBackend}


def get_backend(name: str) -> Backend:
    if name == "tensorrt":
        from vdopt.lower.tensorrt_backend import TensorRTBackend

        return TensorRTBackend()
    try:
        return BACKENDS[name]()
    except KeyError:
        raise LoweringError(f"lower.backend '{name}' is not known; known: {', '.join([*BACKENDS, 'tensorrt'])}.") from None
