// TensorRT segments in the C++ runtime: a bundle's engine (`.plan`) run as a step or part, bound the way
// vdopt/lower/tensorrt_backend.py binds it. Compiled in when CMake finds TensorRT and torch has CUDA
// (VDOPT_WITH_TENSORRT=1); otherwise the Session refuses a TensorRT bundle and says how to build with it.
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#ifndef VDOPT_WITH_TENSORRT
#define VDOPT_WITH_TENSORRT 0
#endif

namespace vdopt {

using Runner = std::function<std::vector<at::Tensor>(std::vector<at::Tensor>)>;

constexpr bool kWithTensorRT = VDOPT_WITH_TENSORRT;

// The engine's tensor names, in the order the runtime passes inputs and receives outputs: a step's (or part's)
// manifest names, an output named like an input getting `.next` (an ONNX value named like an input is that input).
struct EngineBinding {
  std::vector<std::string> inputs, outputs;
};

EngineBinding engine_binding(const std::vector<std::string>& inputs, const std::vector<std::string>& outputs);

#if VDOPT_WITH_TENSORRT
// The engine in `plan` on `device`, on torch's current stream; `device` is CUDA (the Session refuses a TensorRT
// bundle on any other before loading anything). Refused, each with its own message: an engine
// built for another TensorRT or GPU (`build`, the manifest's record of both), one whose tensors are not `binding`'s
// (the bundle was edited), and one that calls a vdopt op (`custom_ops`, 'vdopt::NAME') whose plugin creator is not
// registered in this process. Every call checks the count, dtype, device and shape of its inputs.
Runner tensorrt_runner(const std::filesystem::path& plan, const EngineBinding& binding, const nlohmann::json& build,
                       const std::vector<std::string>& custom_ops, const c10::Device& device);
#endif

}  // namespace vdopt
