// See tensorrt.h. Mirrors TensorRTBackend.load in vdopt/lower/tensorrt_backend.py.
#include "vdopt/tensorrt.h"

#include <algorithm>
#include <set>

#include "vdopt/bundle.h"

#if VDOPT_WITH_TENSORRT
#include <NvInferRuntime.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <fstream>
#include <iostream>
#include <memory>
#endif

namespace vdopt {

EngineBinding engine_binding(const std::vector<std::string>& inputs, const std::vector<std::string>& outputs) {
  EngineBinding binding{inputs, {}};
  for (const auto& name : outputs)
    binding.outputs.push_back(std::find(inputs.begin(), inputs.end(), name) == inputs.end() ? name : name + ".next");
  return binding;
}

#if VDOPT_WITH_TENSORRT

namespace {

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* message) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "TensorRT: " << message << "\n";
  }
};

nvinfer1::IRuntime& runtime() {
  static Logger logger;
  static const std::unique_ptr<nvinfer1::IRuntime> instance(nvinfer1::createInferRuntime(logger));
  if (!instance) throw Error("TensorRT could not create a runtime; see its log above.");
  return *instance;
}

at::ScalarType torch_type(nvinfer1::DataType type, const std::string& where) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: return at::kFloat;
    case nvinfer1::DataType::kHALF: return at::kHalf;
    case nvinfer1::DataType::kBF16: return at::kBFloat16;
    case nvinfer1::DataType::kINT64: return at::kLong;
    case nvinfer1::DataType::kINT32: return at::kInt;
    case nvinfer1::DataType::kBOOL: return at::kBool;
    case nvinfer1::DataType::kUINT8: return at::kByte;
    default: throw Error(where + ": the engine has a tensor of a TensorRT type this runtime does not bind.");
  }
}

std::string text_of(const nlohmann::json& record, const char* key) {
  return record.contains(key) && record[key].is_string() ? record[key].get<std::string>() : std::string("none");
}

// The library reports major.minor.patch (NV_TENSORRT_VERSION_INT); the manifest's version may carry a build number.
std::string major_minor_patch(const std::string& version) {
  size_t dots = 0, end = 0;
  while (end < version.size() && !(version[end] == '.' && ++dots == 3)) ++end;
  return version.substr(0, end);
}

// vdopt/lower/tensorrt_backend.py check_build_target: an engine runs only on the TensorRT and GPU generation it was
// built for.
void check_build_target(const nlohmann::json& build, const std::string& where, const c10::Device& device) {
  if (!build.is_object() || build.empty())
    throw Error(where + ": the manifest does not record which TensorRT and GPU the engine was built for (segment 'build'); "
                "recompile the bundle with this vdopt.");
  const int32_t version = getInferLibVersion();
  const std::string library = std::to_string(version / 10000) + "." + std::to_string(version / 100 % 100) + "." +
                              std::to_string(version % 100);
  cudaDeviceProp properties{};
  if (cudaGetDeviceProperties(&properties, device.index() < 0 ? 0 : device.index()) != cudaSuccess)
    throw Error(where + ": CUDA cannot describe device " + device.str() + ".");
  const std::string capability = std::to_string(properties.major) + "." + std::to_string(properties.minor);
  const auto refuse = [&](const std::string& what, const std::string& built, const std::string& here) {
    throw Error(where + ": the engine was built for " + what + " " + built + ", this machine has " + here + " (" + properties.name +
                "); a TensorRT engine runs only where it was built. Recompile the bundle here (its .onnx file is in the bundle).");
  };
  const std::string built_version = text_of(build, "tensorrt_version"), built_capability = text_of(build, "compute_capability");
  if (major_minor_patch(built_version) != library) refuse("TensorRT", built_version, library);
  if (built_capability != capability) refuse("GPU compute capability", built_capability, capability);
}

// vdopt's ops are TensorRT plugins registered by name (QDP, cuda/plugins/vdopt_plugins.py, in Python); an engine
// that calls one deserialises only where a creator of that name is registered.
void check_plugins(const std::vector<std::string>& custom_ops, const std::string& where) {
  for (const auto& op : custom_ops) {
    const size_t colons = op.find("::");
    const std::string space = colons == std::string::npos ? "" : op.substr(0, colons);
    const std::string name = colons == std::string::npos ? op : op.substr(colons + 2);
    if (getPluginRegistry()->getCreator(name.c_str(), "1", space.c_str()) == nullptr)
      throw Error(where + ": the engine calls " + op + ", a TensorRT plugin with no creator registered in this process (vdopt "
                  "registers its plugins from Python: cuda/plugins/vdopt_plugins.py). Run this bundle with the Python Session, "
                  "register the plugin before opening it, or compile without the ops that need it.");
  }
}

struct Engine {
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  std::vector<at::ScalarType> input_types, output_types;
};

}  // namespace

Runner tensorrt_runner(const std::filesystem::path& plan, const EngineBinding& binding, const nlohmann::json& build,
                       const std::vector<std::string>& custom_ops, const c10::Device& device) {
  const std::string where = plan.filename().string();
  check_build_target(build, where, device);
  check_plugins(custom_ops, where);
  std::ifstream in(plan, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), {});
  auto loaded = std::make_shared<Engine>();
  loaded->engine.reset(runtime().deserializeCudaEngine(bytes.data(), bytes.size()));
  if (!loaded->engine)
    throw Error(where + ": TensorRT could not deserialise the engine (see its log above): it is damaged, or was built by "
                "another TensorRT or for another GPU. Recompile the bundle.");
  std::set<std::string> engine_inputs, engine_outputs;
  for (int32_t k = 0; k < loaded->engine->getNbIOTensors(); ++k) {
    const char* name = loaded->engine->getIOTensorName(k);
    (loaded->engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT ? engine_inputs : engine_outputs).insert(name);
  }
  if (engine_inputs != std::set<std::string>(binding.inputs.begin(), binding.inputs.end()) ||
      engine_outputs != std::set<std::string>(binding.outputs.begin(), binding.outputs.end()))
    throw Error(where + ": the engine's inputs and outputs are not the ones the manifest names for it; the bundle was edited. "
                "Recompile it.");
  for (const auto& name : binding.inputs) loaded->input_types.push_back(torch_type(loaded->engine->getTensorDataType(name.c_str()), where));
  for (const auto& name : binding.outputs) loaded->output_types.push_back(torch_type(loaded->engine->getTensorDataType(name.c_str()), where));
  loaded->context.reset(loaded->engine->createExecutionContext());
  if (!loaded->context) throw Error(where + ": TensorRT could not create an execution context (out of GPU memory?).");
  return [loaded, binding, device, where](std::vector<at::Tensor> inputs) {
    if (inputs.size() != binding.inputs.size())
      throw Error(where + ": " + std::to_string(inputs.size()) + " inputs given, the engine takes " +
                  std::to_string(binding.inputs.size()) + ".");
    nvinfer1::IExecutionContext& context = *loaded->context;
    for (size_t k = 0; k < inputs.size(); ++k) {
      at::Tensor& tensor = inputs[k];  // made contiguous in place: kept alive until the enqueued work is done
      if (!tensor.is_contiguous()) tensor = tensor.contiguous();
      const char* name = binding.inputs[k].c_str();
      if (tensor.scalar_type() != loaded->input_types[k] || tensor.device() != device)
        throw Error(where + ": input '" + binding.inputs[k] + "' is " + std::string(c10::toString(tensor.scalar_type())) + " on " +
                    tensor.device().str() + ", the engine takes " + std::string(c10::toString(loaded->input_types[k])) + " on " +
                    device.str() + ".");
      if (tensor.dim() > nvinfer1::Dims::MAX_DIMS)
        throw Error(where + ": input '" + binding.inputs[k] + "' has more dimensions than TensorRT binds.");
      nvinfer1::Dims dims{};
      dims.nbDims = static_cast<int32_t>(tensor.dim());
      for (int64_t d = 0; d < tensor.dim(); ++d) dims.d[d] = tensor.size(d);
      if (!context.setInputShape(name, dims))
        throw Error(where + ": input '" + binding.inputs[k] + "' has a shape outside the engine's optimisation profile; the "
                    "bundle's dims say which sizes it takes.");
      context.setTensorAddress(name, tensor.data_ptr());
    }
    std::vector<at::Tensor> outputs;
    for (size_t k = 0; k < binding.outputs.size(); ++k) {
      const char* name = binding.outputs[k].c_str();
      const nvinfer1::Dims dims = context.getTensorShape(name);
      std::vector<int64_t> shape(dims.d, dims.d + std::max<int32_t>(dims.nbDims, 0));
      if (dims.nbDims < 0 || std::any_of(shape.begin(), shape.end(), [](int64_t size) { return size < 0; }))
        throw Error(where + ": TensorRT cannot say the shape of output '" + binding.outputs[k] + "' for these inputs.");
      outputs.push_back(at::empty(shape, at::TensorOptions().dtype(loaded->output_types[k]).device(device)));
      context.setTensorAddress(name, outputs.back().data_ptr());
    }
    if (!context.enqueueV3(c10::cuda::getCurrentCUDAStream(device.index()).stream()))
      throw Error(where + ": TensorRT execution failed; see its log above.");
    return outputs;
  };
}

#endif

}  // namespace vdopt
