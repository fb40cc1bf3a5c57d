// Running a vdopt bundle from C++: the same loop as vdopt.Session, on the bundle's AOTInductor segments (and
// TensorRT ones, on CUDA, in a runtime built with TensorRT: vdopt/tensorrt.h).
//
//   vdopt::Session session("clip.vdopt");                        // verified before anything is loaded
//   at::Tensor latent = session.run({{"encoder_hidden_states", text}}, nullptr, {.seed = 0});
//
// Every step is `x, *state = step(x, i, *cond, *uncond, *state)`; a split step (a cache cut at its conditional)
// runs head, then compute or reuse as the head's one-byte flag says, then tail. Custom-op libraries the bundle
// ships are loaded (after their checksums) before any segment. Noise for sample k is torch's CPU generator seeded
// `seed + k`, as in Python, so both give the same clip.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <chrono>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "vdopt/bundle.h"
#include "vdopt/tensorrt.h"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace vdopt {

using Tensors = std::map<std::string, at::Tensor>;

struct RunTiming {
  int64_t steps = 0;
  double total_seconds = 0;     // the whole run: inputs, noise, state, the loop
  double loop_seconds = 0;      // from the first segment call's start to the last one's end: the step loop itself
  double segments_seconds = 0;  // inside the compiled segments (AOTInductor runs); the rest is the runtime's own cost
  std::chrono::steady_clock::time_point first_call, last_call;
};

struct RunOptions {
  int64_t seed = 0;
  std::optional<int64_t> frames, height, width;  // default: the bundle's default sizes
};

class Session {
 public:
  explicit Session(const std::filesystem::path& bundle, const std::string& device = "cpu", bool verify_files = true);
  ~Session();

  // `cond`: conditioning tensors by name (dim 0 = samples); `uncond`: the unconditional ones, or nullptr for the
  // manifest's null rules. Returns the final latent [samples, channels, frames, height, width]. A staged bundle runs
  // its stages in order (each loop from its own noise, each fed earlier outputs) and returns the last one's output.
  at::Tensor run(const Tensors& cond, const Tensors* uncond = nullptr, const RunOptions& options = {});

  // The conditioning of prompts (one sample each) from the bundle's prompt encoder: {cond, uncond}. An Error names
  // a word the vocabulary lacks; bundles without an encoder say to pass conditioning tensors.
  std::pair<Tensors, Tensors> encode(const std::vector<std::string>& prompts);

  const Bundle& bundle() const { return bundle_; }
  const RunTiming& last_timing() const { return timing_; }

 private:
  // A program's segment as one callable: `x, *state = step(x, i, *cond, *uncond, *state)`, a split one wired by name.
  Runner& runner(const Program& program, const Segment& segment);
  // A segment's (or part's) compiled file, and for an engine its tensor names, as a callable whose time counts as
  // segment time.
  Runner load(const Segment& segment, const std::vector<std::string>& files, const EngineBinding& binding);
  Runner aoti(const std::string& file);
  Runner timed(Runner run);
  std::vector<at::Tensor> conditioning(const std::string& prefix, const Tensors& tensors, const Sizes& sizes,
                                       const Segment& segment, const std::vector<int64_t>& multiples) const;
  // One loop stage (or a one-stage bundle): noise of `seed + k` for sample k, the step `num_steps` times.
  at::Tensor loop(const Program& program, const Tensors& cond, const Tensors* uncond, int64_t seed,
                  const std::array<std::optional<int64_t>, 3>& sizes, int64_t batch);

  Bundle bundle_;
  c10::Device device_;
  std::map<std::string, std::shared_ptr<torch::inductor::AOTIModelPackageLoader>> packages_;
  std::map<std::string, Runner> runners_;
  RunTiming timing_;
};

at::ScalarType scalar_type(const std::string& dtype);
at::Tensor initial_noise(int64_t seed, at::IntArrayRef shape, at::ScalarType dtype);

// .safetensors files: conditioning in, latents out (a small reader and writer of the format, no other dependency).
Tensors read_safetensors(const std::filesystem::path& path);
void write_safetensors(const std::filesystem::path& path, const Tensors& tensors);

// A pixel-space clip [samples, 3, frames, height, width] in [-1, 1] as one PNG per frame (samples side by side,
// like `vdopt run -o clip.gif`): DIRECTORY/frame_000.png, ... Returns the files written.
std::vector<std::filesystem::path> write_png_frames(const std::filesystem::path& directory, const at::Tensor& clip);

}  // namespace vdopt
