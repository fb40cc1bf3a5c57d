// vdopt-run: generate a clip's latent from a bundle, as `vdopt run --cond` does, without Python.
//
//   vdopt-run BUNDLE (--prompt TEXT [--prompt TEXT ...] | --cond cond.safetensors [--uncond uncond.safetensors]) [--seed N]
//             [--frames N] [--height N] [--width N] [--device cpu|cuda] [--repeat N] [--timings FILE.json]
//             [--png DIR] -o latent.safetensors
//
// The latent is written as the tensor `latent`. `--timings` writes each run's time, total and inside the compiled
// segments (`--repeat N` runs N times, for bench/cpp.py). `--png DIR` also writes a pixel-space clip's frames. Exit status: 0 done, 2 a bundle or input error (one paragraph on
// stderr), 1 anything else.
#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <tuple>
#include <vector>

#include "vdopt/session.h"

namespace {

int usage(const std::string& why) {
  std::cerr << "vdopt-run: " << why << "\nusage: vdopt-run BUNDLE (--prompt TEXT ... | --cond FILE.safetensors [--uncond FILE.safetensors]) "
               "[--seed N] [--frames N] [--height N] [--width N] [--device cpu|cuda] [--png DIR] -o OUT.safetensors\n";
  return 2;
}

int64_t integer(const std::string& flag, const std::string& text) {
  size_t used = 0;
  const long long value = std::stoll(text, &used);
  if (used != text.size()) throw vdopt::Error(flag + " takes an integer, got '" + text + "'.");
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  std::string bundle, cond, uncond, output, timings, png, device = "cpu";
  std::vector<std::string> prompts;
  int64_t repeat = 1;
  vdopt::RunOptions options;
  try {
    for (int k = 1; k < argc; ++k) {
      const std::string arg = argv[k];
      const auto value = [&]() -> std::string {
        if (k + 1 >= argc) throw vdopt::Error(arg + " needs a value.");
        return argv[++k];
      };
      if (arg == "--cond") cond = value();
      else if (arg == "--prompt") prompts.push_back(value());
      else if (arg == "--uncond") uncond = value();
      else if (arg == "-o" || arg == "--output") output = value();
      else if (arg == "--device") device = value();
      else if (arg == "--seed") options.seed = integer(arg, value());
      else if (arg == "--repeat") repeat = integer(arg, value());
      else if (arg == "--timings") timings = value();
      else if (arg == "--png") png = value();
      else if (arg == "--frames") options.frames = integer(arg, value());
      else if (arg == "--height") options.height = integer(arg, value());
      else if (arg == "--width") options.width = integer(arg, value());
      else if (!arg.empty() && arg[0] == '-') return usage("unknown option " + arg);
      else if (bundle.empty()) bundle = arg;
      else return usage("one bundle at a time (got " + bundle + " and " + arg + ")");
    }
    if (bundle.empty() || (cond.empty() == prompts.empty()) || output.empty())
      return usage("a bundle, --prompt or --cond (not both), and -o are needed");
    vdopt::Session session(bundle, device);
    vdopt::Tensors conditioning, unconditional;
    if (!prompts.empty()) {
      std::tie(conditioning, unconditional) = session.encode(prompts);
      if (session.bundle().guidance) uncond = "the prompt encoder's";
    } else {
      conditioning = vdopt::read_safetensors(cond);
      if (!uncond.empty()) unconditional = vdopt::read_safetensors(uncond);
    }
    at::Tensor latent;
    nlohmann::json runs = nlohmann::json::array();
    for (int64_t k = 0; k < std::max<int64_t>(repeat, 1); ++k) {
      latent = session.run(conditioning, uncond.empty() ? nullptr : &unconditional, options);
      const vdopt::RunTiming& timing = session.last_timing();
      runs.push_back({{"steps", timing.steps}, {"total_seconds", timing.total_seconds}, {"loop_seconds", timing.loop_seconds},
                      {"segments_seconds", timing.segments_seconds}});
    }
    vdopt::write_safetensors(output, {{"latent", latent}});
    if (!png.empty()) std::cout << "wrote " << vdopt::write_png_frames(png, latent).size() << " PNG frames to " << png << "\n";
    if (!timings.empty()) std::ofstream(timings) << nlohmann::json{{"runs", runs}}.dump(2) << "\n";
    std::cout << "wrote " << output << ": latent " << latent.sizes() << " after " << session.last_timing().steps << " steps"
              << (session.bundle().stages.empty() ? "" : " in " + std::to_string(session.bundle().stages.size()) + " stages") << "\n";
    return 0;
  } catch (const vdopt::Error& error) {
    std::cerr << "vdopt-run: error: " << error.what() << "\n";
    return 2;
  } catch (const std::exception& error) {
    const std::string text = error.what();
    std::cerr << "vdopt-run: failed: " << text.substr(0, text.find('\n')) << "\n";
    return 1;
  }
}
