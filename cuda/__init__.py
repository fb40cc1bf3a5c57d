"""Native sources: custom-op kernels (CPU and CUDA), TensorRT plugins, the C++ runtime."""
