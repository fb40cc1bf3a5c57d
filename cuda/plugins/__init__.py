"""TensorRT plugins of vdopt's ops (imported only where TensorRT loads)."""
