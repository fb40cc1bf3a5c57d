// See session.h. Mirrors vdopt/runtime/session.py; tests compare the two on the same bundles.
#include "vdopt/session.h"

#include <ATen/CPUGeneratorImpl.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <regex>
#include <cstdio>
#include <fstream>
#include <functional>
#include <set>

namespace vdopt {
namespace fs = std::filesystem;
using json = nlohmann::json;

at::ScalarType scalar_type(const std::string& dtype) {
  static const std::map<std::string, at::ScalarType> types = {
      {"float32", at::kFloat}, {"bfloat16", at::kBFloat16}, {"float16", at::kHalf}, {"int64", at::kLong},
      {"int32", at::kInt},     {"bool", at::kBool},         {"uint8", at::kByte}};
  const auto found = types.find(dtype);
  if (found == types.end()) throw Error("dtype '" + dtype + "' is not one this runtime knows.");
  return found->second;
}

at::Tensor initial_noise(int64_t seed, at::IntArrayRef shape, at::ScalarType dtype) {
  std::vector<at::Tensor> samples;
  for (int64_t k = 0; k < shape[0]; ++k) {
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed + k));
    samples.push_back(at::randn(shape.slice(1), generator, at::TensorOptions().dtype(at::kFloat)));
  }
  return at::stack(samples).to(dtype);
}

namespace {

void load_op_library(const fs::path& path) {
  static std::set<std::string> loaded;
  if (loaded.count(path.string())) return;
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr)
    throw Error(path.string() + ": the bundle's custom-op library cannot be loaded (" + std::string(dlerror()) +
                "); it was built for another platform or torch. Recompile the bundle here.");
  loaded.insert(path.string());
}

Sizes sizes_of(at::IntArrayRef shape) {
  return {{"batch", shape[0]}, {"frames", shape[2]}, {"height", shape[3]}, {"width", shape[4]}};
}

std::string shape_text(at::IntArrayRef shape) {
  std::string text = "[";
  for (size_t k = 0; k < shape.size(); ++k) text += (k ? ", " : "") + std::to_string(shape[k]);
  return text + "]";
}

}  // namespace

Session::Session(const fs::path& bundle, const std::string& device, bool verify_files)
    : bundle_(bundle, verify_files), device_(device) {
  std::vector<const Segment*> segments;
  for (const auto& segment : bundle_.segments) segments.push_back(&segment);
  for (const auto& stage : bundle_.stages)
    for (const auto& segment : stage.program.segments) segments.push_back(&segment);
  for (const Segment* segment : segments) {
    if (segment->backend != "aoti" && segment->backend != "tensorrt")
      throw Error(bundle.string() + ": segment " + segment->name + " is a " + segment->backend + " segment; the C++ runtime "
                  "runs AOTInductor and TensorRT segments (compile with lower.backend: aoti).");
    if (segment->backend == "tensorrt" && !kWithTensorRT)
      throw Error(bundle.string() + ": segment " + segment->name + " is a TensorRT engine, and this runtime was built without "
                  "TensorRT (CMake found no NvInferRuntime.h and libnvinfer, or torch without CUDA). Rebuild it on a GPU "
                  "machine with -DTensorRT_ROOT=DIR, or run the bundle with the Python Session.");
    if (segment->backend == "tensorrt" && !device_.is_cuda())
      throw Error(bundle.string() + ": segment " + segment->name + " is a TensorRT engine, which runs on a CUDA device: pass "
                  "--device cuda.");
  }
  for (const auto& library : bundle_.op_libraries) load_op_library(bundle_.file(library));
}

Session::~Session() = default;

Runner Session::timed(Runner run) {
  RunTiming* timing = &timing_;
  return [run = std::move(run), timing](std::vector<at::Tensor> inputs) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<at::Tensor> outputs = run(std::move(inputs));
    const auto end = std::chrono::steady_clock::now();
    timing->segments_seconds += std::chrono::duration<double>(end - start).count();
    if (timing->first_call == std::chrono::steady_clock::time_point{}) timing->first_call = start;
    timing->last_call = end;
    return outputs;
  };
}

Runner Session::aoti(const std::string& file) {
  auto& loader = packages_[file];
  if (!loader) loader = std::make_shared<torch::inductor::AOTIModelPackageLoader>(bundle_.file(file).string());
  std::shared_ptr<torch::inductor::AOTIModelPackageLoader> kept = loader;
  return [kept](std::vector<at::Tensor> inputs) {
    for (auto& tensor : inputs)  // AOTInductor reads inputs at their traced strides; is_contiguous() skips a dispatch
      if (!tensor.is_contiguous()) tensor = tensor.contiguous();
    return kept->run(inputs);
  };
}

Runner Session::load(const Segment& segment, const std::vector<std::string>& files, const EngineBinding& binding) {
#if VDOPT_WITH_TENSORRT
  if (segment.backend == "tensorrt")
    return timed(tensorrt_runner(bundle_.file(files.at(0)), binding, segment.build, bundle_.custom_ops, device_));
#else
  (void)segment, (void)binding;  // the constructor refused TensorRT segments
#endif
  return timed(aoti(files.at(0)));
}

Runner& Session::runner(const Program& program, const Segment& segment) {
  auto found = runners_.find(segment.name);
  if (found != runners_.end()) return found->second;
  const auto names = [](const std::vector<TensorSpec>& specs) {
    std::vector<std::string> listed;
    for (const auto& spec : specs) listed.push_back(spec.name);
    return listed;
  };
  if (segment.kind == "step")
    return runners_[segment.name] = load(segment, segment.files, engine_binding(names(segment.inputs), names(program.outputs)));
  // Values are wired by name in the manifest; here each name gets a slot once, so a step moves tensors by index.
  std::map<std::string, size_t> slot;
  const auto slot_of = [&slot](const std::string& name) { return slot.emplace(name, slot.size()).first->second; };
  std::vector<size_t> step_inputs, step_outputs;
  for (const auto& spec : segment.inputs) step_inputs.push_back(slot_of(spec.name));  // x, i, cond.*, uncond.*, state.*
  struct Wired {
    Runner run;
    std::vector<size_t> reads, writes;
  };
  std::map<std::string, Wired> parts;
  for (const auto& part : segment.parts) {
    Wired wired{load(segment, part.files, engine_binding(part.inputs, part.outputs)), {}, {}};
    for (const auto& name : part.inputs) wired.reads.push_back(slot_of(name));
    for (const auto& name : part.outputs) wired.writes.push_back(slot_of(name));
    parts[part.name] = std::move(wired);
  }
  for (const auto& spec : program.outputs) step_outputs.push_back(slot_of(spec.name));
  const size_t flag = slot_of(segment.flag), slots = slot.size();
  const Wired head = parts.at("head"), compute = parts.at("compute"), reuse = parts.at("reuse"), tail = parts.at("tail");
  return runners_[segment.name] = [=](std::vector<at::Tensor> inputs) {
    std::vector<at::Tensor> values(slots);
    for (size_t k = 0; k < inputs.size() && k < step_inputs.size(); ++k) values[step_inputs[k]] = std::move(inputs[k]);
    const auto call = [&values](const Wired& part) {
      std::vector<at::Tensor> arguments;
      arguments.reserve(part.reads.size());
      for (size_t read : part.reads) arguments.push_back(values[read]);
      std::vector<at::Tensor> results = part.run(std::move(arguments));
      for (size_t k = 0; k < part.writes.size(); ++k) values[part.writes[k]] = std::move(results.at(k));
    };
    call(head);
    const at::Tensor& decision = values[flag];  // a CPU bool is read in place; item() would be a dispatch (and a sync on CUDA)
    call((decision.is_cpu() && decision.scalar_type() == at::kBool ? *decision.const_data_ptr<bool>() : decision.item<bool>())
             ? compute : reuse);
    call(tail);
    std::vector<at::Tensor> outputs;
    outputs.reserve(step_outputs.size());
    for (size_t k : step_outputs) outputs.push_back(values[k]);
    return outputs;
  };
}

std::pair<Tensors, Tensors> Session::encode(const std::vector<std::string>& prompts) {
  if (!bundle_.prompt_encoder)
    throw Error(bundle_.directory().string() + ": this " + bundle_.family + " bundle carries no prompt encoder (only "
                "AOTInductor bundles of families that ship one do); give --cond FILE.safetensors.");
  const PromptEncoder& encoder = *bundle_.prompt_encoder;
  // '<colour> <shape> moving <direction>', any case and spacing, as vdopt.data.moving_shapes.parse_prompt
  static const std::regex grammar(R"(^\s*(\w+)\s+(\w+)\s+moving\s+([\w-]+)\s*$)");
  const std::vector<std::string> slots = {"colour", "shape", "direction"};
  std::vector<int64_t> indices;
  for (const auto& prompt : prompts) {
    std::string lower = prompt;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
    std::smatch words;
    if (!std::regex_match(lower, words, grammar))
      throw Error("prompt '" + prompt + "' is not of the form '<colour> <shape> moving <direction>'.");
    for (const auto& attribute : encoder.attrs) {
      const size_t slot = static_cast<size_t>(std::find(slots.begin(), slots.end(), attribute) - slots.begin());
      if (slot == slots.size()) throw Error("the prompt encoder's attribute '" + attribute + "' is not one this runtime parses.");
      const std::string word = words[slot + 1];
      const auto& vocabulary = encoder.vocabulary.at(attribute);
      const auto found = std::find(vocabulary.begin(), vocabulary.end(), word);
      if (found == vocabulary.end()) {
        std::string known;
        for (const auto& w : vocabulary) known += (known.empty() ? "" : ", ") + w;
        throw Error("prompt '" + prompt + "': unknown " + attribute + " '" + word + "'; expected one of " + known + ".");
      }
      indices.push_back(found - vocabulary.begin());
    }
  }
  const at::Tensor attrs = at::tensor(indices, at::TensorOptions().dtype(at::kLong))
                               .reshape({static_cast<int64_t>(prompts.size()), static_cast<int64_t>(encoder.attrs.size())});
  const std::vector<at::Tensor> outputs = timed(aoti(encoder.file))({attrs.to(device_)});
  std::pair<Tensors, Tensors> encoded;
  for (size_t k = 0; k < encoder.outputs.size() && k < outputs.size(); ++k) {
    const std::string& name = encoder.outputs[k];
    (name.rfind("cond.", 0) == 0 ? encoded.first : encoded.second)[name.substr(name.find('.') + 1)] = outputs[k];
  }
  return encoded;
}

std::vector<at::Tensor> Session::conditioning(const std::string& prefix, const Tensors& tensors, const Sizes& sizes,
                                              const Segment& segment, const std::vector<int64_t>& multiples) const {
  std::vector<at::Tensor> ordered;
  for (const auto& spec : segment.inputs) {
    if (spec.name.rfind(prefix + ".", 0) != 0) continue;
    const std::string key = spec.name.substr(prefix.size() + 1);
    std::vector<int64_t> expected;
    for (const auto& size : spec.shape) expected.push_back(resolve_size(size, sizes, multiples));
    const auto found = tensors.find(key);
    if (found == tensors.end())
      throw Error("missing conditioning input '" + spec.name + "' (expected shape " + shape_text(expected) + ", " + spec.dtype + ").");
    if (found->second.sizes() != at::IntArrayRef(expected))
      throw Error("conditioning input '" + spec.name + "' has shape " + shape_text(found->second.sizes()) + "; this bundle "
                  "expects " + shape_text(expected) + " for " + std::to_string(sizes.at("batch")) + " sample(s).");
    if (!found->second.is_floating_point() && scalar_type(spec.dtype) != found->second.scalar_type())
      throw Error("conditioning input '" + spec.name + "' is " + std::string(c10::toString(found->second.scalar_type())) +
                  "; this bundle expects " + spec.dtype + ".");
    ordered.push_back(found->second.to(device_, scalar_type(spec.dtype)).contiguous());
  }
  return ordered;
}

at::Tensor Session::run(const Tensors& cond, const Tensors* uncond, const RunOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  timing_ = RunTiming{};
  if (cond.empty()) throw Error("no conditioning tensors were given.");
  const int64_t batch = cond.begin()->second.dim() ? cond.begin()->second.size(0) : 0;
  for (const auto& [name, tensor] : cond)
    if (!tensor.dim() || tensor.size(0) != batch) throw Error("conditioning tensors must share their first (batch) dimension.");
  at::Tensor result;
  if (bundle_.stages.empty()) {
    result = loop(bundle_, cond, uncond, options.seed, {options.frames, options.height, options.width}, batch);
  } else {
    if (options.frames || options.height || options.width)
      throw Error("this bundle runs in stages (content -> motion -> decode) at the sizes it was compiled for; it takes no "
                  "frames, height or width.");
    Tensors values;
    for (const auto& stage : bundle_.stages) {
      Tensors fed;
      for (const auto& [input, source] : stage.feeds) fed[input] = values.at(source);
      if (stage.kind == "call") {
        const Segment& segment = stage.program.segments.front();
        std::vector<at::Tensor> inputs;
        for (const auto& spec : segment.inputs) {
          if (!fed.count(spec.name)) throw Error(stage.name + ": input '" + spec.name + "' is fed by no earlier stage.");
          inputs.push_back(fed.at(spec.name));
        }
        values[stage.output] = runner(stage.program, segment)(std::move(inputs)).at(0);
        continue;
      }
      Tensors stage_cond = cond, stage_uncond = uncond ? *uncond : Tensors{};
      for (const auto& [input, tensor] : fed) {
        const std::string name = input.substr(input.find('.') + 1);
        stage_cond[name] = tensor;
        const auto rule = stage.program.null_cond.find(name);
        if (uncond && rule != stage.program.null_cond.end())
          stage_uncond[name] = rule->second == "zeros" ? at::zeros_like(tensor) : rule->second == "ones" ? at::ones_like(tensor) : tensor;
      }
      values[stage.output] = loop(stage.program, stage_cond, uncond ? &stage_uncond : nullptr, options.seed + stage.noise_offset,
                                  {}, batch);
    }
    result = values.at(bundle_.stages.back().output);
  }
  timing_.total_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  timing_.loop_seconds = std::chrono::duration<double>(timing_.last_call - timing_.first_call).count();
  return result;
}

at::Tensor Session::loop(const Program& program, const Tensors& cond, const Tensors* uncond, int64_t seed,
                         const std::array<std::optional<int64_t>, 3>& requested, int64_t batch) {
  if (batch < program.batch_min || batch > program.batch_max)
    throw Error(std::to_string(batch) + " sample(s) per call; this bundle was compiled for " + std::to_string(program.batch_min) +
                ".." + std::to_string(program.batch_max) + " (model.input.batch).");
  const int64_t frames = requested[0].value_or(program.default_sizes.at("frames"));
  const int64_t height = requested[1].value_or(program.default_sizes.at("height"));
  const int64_t width = requested[2].value_or(program.default_sizes.at("width"));
  const std::vector<int64_t> shape = {batch, program.channels, frames, height, width};
  for (size_t k = 0; k < 3; ++k)
    if (shape[2 + k] % program.multiples[k])
      throw Error("frames, height and width must be multiples of " + shape_text(program.multiples) + "; got " +
                  shape_text(at::IntArrayRef(shape).slice(2)) + ".");
  const Sizes sizes = sizes_of(shape);
  const Segment* segment = nullptr;
  for (const auto& candidate : program.segments) {
    bool fits = true;
    for (const auto& [dim, range] : candidate.dims) fits = fits && range.first <= sizes.at(dim) && sizes.at(dim) <= range.second;
    if (fits) { segment = &candidate; break; }
  }
  if (segment == nullptr) throw Error("sizes " + shape_text(shape) + " are outside what this bundle was compiled for.");
  std::vector<at::Tensor> conds = conditioning("cond", cond, sizes, *segment, program.multiples);
  if (program.guidance) {
    Tensors null;
    if (uncond == nullptr) {
      for (const auto& [name, rule] : program.null_cond) {
        const at::Tensor& given = cond.at(name);
        null[name] = rule == "zeros" ? at::zeros_like(given) : rule == "ones" ? at::ones_like(given) : given.clone();
      }
      uncond = &null;
    }
    for (auto& tensor : conditioning("uncond", *uncond, sizes, *segment, program.multiples)) conds.push_back(tensor);
  }
  at::Tensor x = initial_noise(seed, shape, scalar_type(program.latent_dtype)).to(device_);
  std::vector<at::Tensor> state;
  for (const auto& spec : segment->state) {
    std::vector<int64_t> dims;
    for (const auto& size : spec.shape) dims.push_back(resolve_size(size, sizes, program.multiples));
    const auto options_ = at::TensorOptions().dtype(scalar_type(spec.dtype)).device(device_);
    state.push_back(spec.init == "ones" ? at::ones(dims, options_) : at::zeros(dims, options_));
  }
  Runner& step = runner(program, *segment);
  std::vector<at::Tensor> indices;  // made before the loop: the loop itself only calls segments
  for (int64_t i = 0; i < program.num_steps; ++i)
    indices.push_back(at::scalar_tensor(i, at::TensorOptions().dtype(at::kLong).device(device_)));
  for (int64_t i = 0; i < program.num_steps; ++i) {
    std::vector<at::Tensor> inputs = {x, indices[i]};
    inputs.insert(inputs.end(), conds.begin(), conds.end());
    inputs.insert(inputs.end(), state.begin(), state.end());
    std::vector<at::Tensor> outputs = step(std::move(inputs));
    if (outputs.size() != 1 + state.size())
      throw Error(segment->name + ": the step returned " + std::to_string(outputs.size()) + " tensors, the manifest declares " +
                  std::to_string(1 + state.size()) + "; the bundle does not match its manifest. Recompile it.");
    x = outputs[0];
    state.assign(outputs.begin() + 1, outputs.end());
  }
  timing_.steps += program.num_steps;
  return x;
}

// ----- .safetensors -----------------------------------------------------------------------------------------------
namespace {

const std::map<std::string, at::ScalarType>& safetensors_types() {
  static const std::map<std::string, at::ScalarType> types = {
      {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16}, {"F64", at::kDouble},
      {"I64", at::kLong},  {"I32", at::kInt},  {"U8", at::kByte},       {"BOOL", at::kBool}};
  return types;
}

}  // namespace

Tensors read_safetensors(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot be read.");
  const std::string bytes((std::istreambuf_iterator<char>(in)), {});
  uint64_t header_size = 0;
  if (bytes.size() < 8) throw Error(path.string() + ": not a .safetensors file (too short).");
  for (int k = 7; k >= 0; --k) header_size = header_size << 8 | static_cast<unsigned char>(bytes[k]);
  if (header_size > bytes.size() - 8) throw Error(path.string() + ": not a .safetensors file (its header runs past the end).");
  json header;
  try {
    header = json::parse(bytes.substr(8, header_size));
  } catch (const json::exception&) {
    throw Error(path.string() + ": not a .safetensors file (its header is not JSON).");
  }
  const size_t data = 8 + header_size;
  Tensors tensors;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    try {
      const auto type = safetensors_types().find(entry.at("dtype").get<std::string>());
      if (type == safetensors_types().end()) throw Error(path.string() + ": tensor '" + name + "' has a dtype this runtime does not read.");
      const auto shape = entry.at("shape").get<std::vector<int64_t>>();
      const auto offsets = entry.at("data_offsets").get<std::vector<uint64_t>>();
      at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(type->second));
      const uint64_t size = static_cast<uint64_t>(tensor.numel()) * tensor.element_size();
      if (offsets.size() != 2 || offsets[1] - offsets[0] != size || data + offsets[1] > bytes.size() || offsets[0] > offsets[1])
        throw Error(path.string() + ": tensor '" + name + "' does not fit its data offsets.");
      std::memcpy(tensor.data_ptr(), bytes.data() + data + offsets[0], size);
      tensors[name] = tensor;
    } catch (const json::exception&) {
      throw Error(path.string() + ": tensor '" + name + "' has no dtype, shape or data_offsets.");
    }
  }
  return tensors;
}

void write_safetensors(const fs::path& path, const Tensors& tensors) {
  json header = json::object();
  std::string data;
  for (const auto& [name, given] : tensors) {
    const at::Tensor tensor = given.to(at::kCPU).contiguous();
    std::string dtype;
    for (const auto& [text, type] : safetensors_types())
      if (type == tensor.scalar_type()) dtype = text;
    if (dtype.empty()) throw Error("tensor '" + name + "' has a dtype .safetensors has no name for here.");
    const size_t size = static_cast<size_t>(tensor.numel()) * tensor.element_size();
    header[name] = {{"dtype", dtype}, {"shape", tensor.sizes().vec()}, {"data_offsets", {data.size(), data.size() + size}}};
    data.append(static_cast<const char*>(tensor.data_ptr()), size);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const fs::path staging = path.string() + ".partial";
  {
    std::ofstream out(staging, std::ios::binary | std::ios::trunc);
    if (!out) throw Error(path.string() + ": cannot be written.");
    for (int k = 0; k < 8; ++k) out.put(static_cast<char>((static_cast<uint64_t>(text.size()) >> (8 * k)) & 0xff));
    out << text << data;
    if (!out) throw Error(path.string() + ": writing failed.");
  }
  fs::rename(staging, path);
}

namespace {

void png_chunk(std::string& out, const char* type, const std::string& data) {
  for (int k = 3; k >= 0; --k) out.push_back(static_cast<char>((data.size() >> (8 * k)) & 0xff));
  const std::string body = std::string(type, 4) + data;
  out += body;
  const uLong crc = crc32(0L, reinterpret_cast<const Bytef*>(body.data()), static_cast<uInt>(body.size()));
  for (int k = 3; k >= 0; --k) out.push_back(static_cast<char>((crc >> (8 * k)) & 0xff));
}

std::string big_endian(uint32_t value) {
  return {static_cast<char>(value >> 24), static_cast<char>(value >> 16), static_cast<char>(value >> 8), static_cast<char>(value)};
}

}  // namespace

std::vector<fs::path> write_png_frames(const fs::path& directory, const at::Tensor& clip) {
  if (clip.dim() != 5 || clip.size(1) != 3)
    throw Error("PNG frames need a pixel-space clip [samples, 3, frames, height, width]; this latent is " +
                shape_text(clip.sizes()) + " (decode it with the family's VAE first).");
  // the mapping of vdopt.video.to_frames, at the clip's own resolution
  const at::Tensor rgb = ((clip.detach().to(at::kCPU, at::kFloat).clamp(-1, 1) + 1) / 2 * 255).round().to(at::kByte);
  const at::Tensor frames = rgb.permute({2, 3, 0, 4, 1}).reshape({clip.size(2), clip.size(3), -1, 3}).contiguous();
  const uint32_t height = static_cast<uint32_t>(frames.size(1)), width = static_cast<uint32_t>(frames.size(2));
  fs::create_directories(directory);
  std::vector<fs::path> written;
  for (int64_t f = 0; f < frames.size(0); ++f) {
    const uint8_t* pixels = frames[f].data_ptr<uint8_t>();
    std::string raw;
    for (uint32_t row = 0; row < height; ++row) {
      raw.push_back(0);  // filter: none
      raw.append(reinterpret_cast<const char*>(pixels + static_cast<size_t>(row) * width * 3), static_cast<size_t>(width) * 3);
    }
    std::string packed(compressBound(static_cast<uLong>(raw.size())), '\0');
    uLongf size = static_cast<uLongf>(packed.size());
    if (compress2(reinterpret_cast<Bytef*>(packed.data()), &size, reinterpret_cast<const Bytef*>(raw.data()),
                  static_cast<uLong>(raw.size()), 6) != Z_OK)
      throw Error("PNG: zlib could not compress a frame.");
    packed.resize(size);
    std::string png = "\x89PNG\r\n\x1a\n";
    png_chunk(png, "IHDR", big_endian(width) + big_endian(height) + std::string("\x08\x02\x00\x00\x00", 5));
    png_chunk(png, "IDAT", packed);
    png_chunk(png, "IEND", "");
    char name[32];
    std::snprintf(name, sizeof(name), "frame_%03lld.png", static_cast<long long>(f));
    std::ofstream(directory / name, std::ios::binary) << png;
    written.push_back(directory / name);
  }
  return written;
}

}  // namespace vdopt
