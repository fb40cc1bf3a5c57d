// Opening a vdopt bundle from C++ exactly as vdopt.bundle does in Python, before any of its code is loaded:
// manifest.json against manifest.sha256, the schema version, every path confined to the bundle (no absolute
// path, '..', backslash or symlink), every file against its SHA-256. No torch here: shapes are expressions
// of the step dims evaluated by a small grammar (ints, names, + - * //, parentheses), never as code.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace vdopt {

constexpr int kSchemaVersion = 3;     // vdopt/bundle.py SCHEMA_VERSION
constexpr int kMinSchemaVersion = 2;  // vdopt/bundle.py READABLE_SCHEMAS: 2 is 3 without stages

// Every failure to open or run a bundle: one paragraph that says what is wrong and what to do.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

std::string sha256_hex(const std::string& bytes);
std::string sha256_file(const std::filesystem::path& path);

// `name` as a path inside `root`, or an Error naming `where` when it is absolute, climbs out, or is a link.
std::filesystem::path confined(const std::filesystem::path& root, const std::string& name, const std::string& where);

using Sizes = std::map<std::string, int64_t>;  // batch, frames, height, width (and NAME_units, derived)

// A manifest size: an int or an expression of the step dims (`2*batch`, `height_units*width_units*frames`).
int64_t resolve_size(const nlohmann::json& size, const Sizes& sizes, const std::vector<int64_t>& multiples);

struct TensorSpec {
  std::string name;
  nlohmann::json shape;  // ints and expression strings
  std::string dtype;     // float32, bfloat16, float16, int64, bool, ...
  std::string init = "zeros";
};

struct Part {
  std::string name;
  std::vector<std::string> files, inputs, outputs;
};

struct Segment {
  std::string name, kind, backend, flag;
  std::vector<std::string> files;
  std::map<std::string, std::pair<int64_t, int64_t>> dims;
  std::vector<TensorSpec> inputs, state;
  std::vector<Part> parts;
  nlohmann::json build;
};

// The family's prompt encoder as a package (the reference family's): prompts parsed by `template` into one index
// per attribute word, in `attrs` order, each from its vocabulary; the package maps them to cond and uncond tensors.
struct PromptEncoder {
  std::string file;
  std::vector<std::string> attrs;                             // the order of the package's input columns
  std::map<std::string, std::vector<std::string>> vocabulary;  // attribute -> words
  std::vector<std::string> outputs;                           // cond.NAME, uncond.NAME
};

// One step program and what driving it needs: a one-stage bundle's top level, or one stage of a staged bundle. A
// `call` stage (a decode) has only inputs, outputs and segments.
struct Program {
  std::string latent_dtype;
  int64_t num_steps = 0, channels = 0, batch_min = 1, batch_max = 1;
  bool guidance = false;
  std::vector<int64_t> multiples;
  Sizes default_sizes;
  std::vector<TensorSpec> inputs, outputs, state;
  std::vector<Segment> segments;
  std::map<std::string, std::string> null_cond;  // conditioning name -> zeros | ones | same
};

// A stage of a staged bundle (schema 3, e.g. CMD's content loop -> motion loop -> decode): a `loop` runs its program
// from noise of seed `seed + noise_offset + k` for sample k, a `call` runs it once; `feeds` maps its inputs to earlier
// stages' outputs.
struct Stage {
  std::string name, kind, output;
  std::map<std::string, std::string> feeds;
  int64_t noise_offset = 0;
  Program program;
};

class Bundle : public Program {
 public:
  // Verifies everything before returning; `verify_files=false` skips only hashing file contents.
  explicit Bundle(const std::filesystem::path& directory, bool verify_files = true);

  const std::filesystem::path& directory() const { return directory_; }
  const nlohmann::json& manifest() const { return manifest_; }
  std::filesystem::path file(const std::string& name) const;  // a checksummed file of the bundle

  std::string family;
  std::vector<Stage> stages;                    // empty for a one-stage bundle (the top level is its program)
  std::vector<std::string> op_libraries;        // bundle file names, loaded before any segment
  std::vector<std::string> custom_ops;          // the vdopt ops the programs call ('vdopt::cache_decision', ...)
  std::optional<PromptEncoder> prompt_encoder;  // AOTInductor bundles of families that ship one

 private:
  std::filesystem::path directory_;
  nlohmann::json manifest_;
};

}  // namespace vdopt
