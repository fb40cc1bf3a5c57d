// See bundle.h. Mirrors vdopt/bundle.py (read_manifest, check_paths, verify_checksums) and vdopt/safety.py
// (shape expressions); the tests run both on the same bundles.
#include "vdopt/bundle.h"

#include <sys/stat.h>

#include <array>
#include <cctype>
#include <cstring>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

namespace vdopt {
namespace fs = std::filesystem;
using json = nlohmann::json;

// ----- SHA-256 (FIPS 180-4) -------------------------------------------------------------------------------------
namespace {

constexpr std::array<uint32_t, 64> kRound = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01,
    0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc,
    0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08,
    0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

class Sha256 {
 public:
  void update(const unsigned char* data, size_t size) {
    length_ += size;
    while (size > 0) {
      const size_t take = std::min(size, sizeof(block_) - used_);
      std::memcpy(block_ + used_, data, take);
      used_ += take, data += take, size -= take;
      if (used_ == sizeof(block_)) compress(), used_ = 0;
    }
  }
  std::string hex() {
    const uint64_t bits = length_ * 8;
    const unsigned char pad = 0x80, zero = 0;
    update(&pad, 1);
    while (used_ != 56) update(&zero, 1);
    for (int k = 7; k >= 0; --k) {
      const unsigned char byte = static_cast<unsigned char>(bits >> (8 * k));
      update(&byte, 1);
    }
    std::ostringstream out;
    for (uint32_t word : state_)
      for (int k = 3; k >= 0; --k) out << "0123456789abcdef"[(word >> (8 * k + 4)) & 15] << "0123456789abcdef"[(word >> (8 * k)) & 15];
    return out.str();
  }

 private:
  void compress() {
    uint32_t w[64];
    for (int t = 0; t < 16; ++t)
      w[t] = uint32_t(block_[4 * t]) << 24 | uint32_t(block_[4 * t + 1]) << 16 | uint32_t(block_[4 * t + 2]) << 8 | block_[4 * t + 3];
    for (int t = 16; t < 64; ++t) {
      const uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      const uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = state_[0], b = state_[1], c = state_[2], d = state_[3], e = state_[4], f = state_[5], g = state_[6], h = state_[7];
    for (int t = 0; t < 64; ++t) {
      const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + kRound[t] + w[t];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    const uint32_t add[8] = {a, b, c, d, e, f, g, h};
    for (int k = 0; k < 8; ++k) state_[k] += add[k];
  }

  std::array<uint32_t, 8> state_ = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char block_[64] = {};
  size_t used_ = 0;
  uint64_t length_ = 0;
};

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot be read.");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

std::string sha256_hex(const std::string& bytes) {
  Sha256 digest;
  digest.update(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  return digest.hex();
}

std::string sha256_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot be read.");
  Sha256 digest;
  std::array<char, 1 << 16> chunk;
  while (in.read(chunk.data(), chunk.size()) || in.gcount() > 0)
    digest.update(reinterpret_cast<const unsigned char*>(chunk.data()), static_cast<size_t>(in.gcount()));
  return digest.hex();
}

// ----- paths ----------------------------------------------------------------------------------------------------
fs::path confined(const fs::path& root, const std::string& name, const std::string& where) {
  const fs::path relative(name);
  bool climbs = name.empty() || relative.is_absolute() || name.find('\\') != std::string::npos || name.find('\0') != std::string::npos;
  for (const auto& component : relative) climbs = climbs || component == ".." || component == ".";
  if (climbs)
    throw Error(root.string() + ": " + where + " names '" + name + "', which points outside the bundle (absolute path, '..' "
                "or backslash). A bundle only names its own files; the manifest was edited or crafted. Do not use this "
                "bundle; recompile it from its recipe.");
  fs::path path = root;
  for (const auto& component : relative) {
    path /= component;
    struct stat info;
    if (lstat(path.c_str(), &info) == 0 && S_ISLNK(info.st_mode))
      throw Error(root.string() + ": " + where + " '" + name + "' is a symbolic link; a bundle holds real files. Copy it "
                  "with symlinks resolved (cp -rL) or recompile it.");
  }
  return path;
}

// ----- shape expressions: expr := term (('+'|'-') term)*, term := factor (('*'|'//') factor)*,
//       factor := '-' factor | INT | NAME | '(' expr ')' ------------------------------------------------------------
namespace {

class ShapeParser {
 public:
  ShapeParser(const std::string& text, const Sizes& values) : text_(text), values_(values) {}
  int64_t parse() {
    const int64_t value = expr();
    skip();
    if (at_ < text_.size()) fail("unexpected '" + text_.substr(at_, 1) + "'");
    return value;
  }

 private:
  void skip() {
    while (at_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[at_]))) ++at_;
  }
  bool take(const char* token) {
    skip();
    if (text_.compare(at_, std::strlen(token), token) != 0) return false;
    at_ += std::strlen(token);
    return true;
  }
  [[noreturn]] void fail(const std::string& why) const {
    throw Error("shape '" + text_.substr(0, 80) + "': " + why + "; the manifest was edited or written by another version.");
  }
  int64_t expr() {
    int64_t value = term();
    for (;;) {
      if (take("+")) value += term();
      else if (take("-")) value -= term();
      else return value;
    }
  }
  int64_t term() {
    int64_t value = factor();
    for (;;) {
      if (take("//")) {
        const int64_t divisor = factor();
        if (divisor == 0) fail("it divides by zero");
        const int64_t q = value / divisor;
        value = (value % divisor != 0 && ((value < 0) != (divisor < 0))) ? q - 1 : q;  // Python's floor division
      } else if (take("*")) {
        value *= factor();
      } else {
        return value;
      }
    }
  }
  int64_t factor() {
    if (++depth_ > 64) fail("it nests too deeply");
    int64_t value = 0;
    skip();
    if (take("-")) {
      value = -factor();
    } else if (take("(")) {
      value = expr();
      if (!take(")")) fail("a parenthesis is not closed");
    } else if (at_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[at_]))) {
      size_t end = at_;
      while (end < text_.size() && std::isdigit(static_cast<unsigned char>(text_[end]))) ++end;
      if (end - at_ > 15) fail("a number is too long");
      value = std::stoll(text_.substr(at_, end - at_));
      at_ = end;
    } else if (at_ < text_.size() && (std::isalpha(static_cast<unsigned char>(text_[at_])) || text_[at_] == '_')) {
      size_t end = at_;
      while (end < text_.size() && (std::isalnum(static_cast<unsigned char>(text_[end])) || text_[end] == '_')) ++end;
      const std::string name = text_.substr(at_, end - at_);
      const auto found = values_.find(name);
      if (found == values_.end()) fail("it names '" + name + "', which is not a step dim");
      value = found->second;
      at_ = end;
    } else {
      fail("expected a number, a dim name or '('");
    }
    --depth_;
    return value;
  }

  const std::string& text_;
  const Sizes& values_;
  size_t at_ = 0;
  int depth_ = 0;
};

}  // namespace

int64_t resolve_size(const json& size, const Sizes& sizes, const std::vector<int64_t>& multiples) {
  if (size.is_number_integer()) return size.get<int64_t>();
  if (!size.is_string()) throw Error("a manifest size is neither an int nor an expression: " + size.dump().substr(0, 80));
  Sizes values = sizes;
  const char* latent[] = {"frames", "height", "width"};
  for (size_t k = 0; k < 3 && k < multiples.size(); ++k)
    if (sizes.count(latent[k])) values[std::string(latent[k]) + "_units"] = sizes.at(latent[k]) / multiples[k];
  return ShapeParser(size.get<std::string>(), values).parse();
}

// ----- the manifest -----------------------------------------------------------------------------------------------
namespace {

[[noreturn]] void malformed(const fs::path& directory, const std::string& what) {
  throw Error(directory.string() + ": the manifest does not have the form this vdopt reads: " + what + ". It was edited or "
              "written by another version; recompile the bundle.");
}

template <typename T>
T field(const fs::path& directory, const json& object, const char* key, const std::string& where) {
  if (!object.is_object() || !object.contains(key)) malformed(directory, where + "." + key + " is missing");
  try {
    return object.at(key).get<T>();
  } catch (const json::exception&) {
    malformed(directory, where + "." + key + " has the wrong type");
  }
}

std::vector<TensorSpec> specs(const fs::path& directory, const json& list, const std::string& where) {
  if (!list.is_array()) malformed(directory, where + " should be a list");
  std::vector<TensorSpec> out;
  for (size_t k = 0; k < list.size(); ++k) {
    const std::string here = where + "[" + std::to_string(k) + "]";
    TensorSpec spec{field<std::string>(directory, list[k], "name", here), list[k].value("shape", json::array()),
                    field<std::string>(directory, list[k], "dtype", here), list[k].value("init", std::string("zeros"))};
    if (!spec.shape.is_array()) malformed(directory, here + ".shape should be a list");
    out.push_back(spec);
  }
  return out;
}

std::vector<std::string> strings(const fs::path& directory, const json& object, const char* key, const std::string& where) {
  return object.contains(key) ? field<std::vector<std::string>>(directory, object, key, where) : std::vector<std::string>{};
}

void parse_program(const fs::path& directory, const json& m, const std::string& where, bool loop,
                   const std::function<void(const std::string&, const std::string&)>& named, Program& p) {
  const std::string prefix = where == "manifest" ? "" : where + ".";
  if (loop) {
    p.num_steps = field<int64_t>(directory, m, "num_steps", where);
    p.guidance = field<bool>(directory, m, "guidance", where);
    const json& latent = m.value("latent", json());
    p.channels = field<int64_t>(directory, latent, "channels", prefix + "latent");
    p.latent_dtype = field<std::string>(directory, latent, "dtype", prefix + "latent");
    const auto batch = field<std::vector<int64_t>>(directory, latent, "batch", prefix + "latent");
    if (batch.size() != 2 || batch[0] < 1 || batch[0] > batch[1]) malformed(directory, prefix + "latent.batch should be [min, max]");
    p.batch_min = batch[0], p.batch_max = batch[1];
    p.multiples = field<std::vector<int64_t>>(directory, latent, "multiples", prefix + "latent");
    if (p.multiples.size() != 3) malformed(directory, prefix + "latent.multiples should be three ints");
    for (const char* dim : {"frames", "height", "width"})
      p.default_sizes[dim] = field<int64_t>(directory, latent.value("default_sizes", json::object()), dim, prefix + "latent.default_sizes");
  } else {
    p.multiples = {1, 1, 1};
  }
  p.inputs = specs(directory, m.value("inputs", json()), prefix + "inputs");
  p.outputs = specs(directory, m.value("outputs", json()), prefix + "outputs");
  p.state = specs(directory, m.value("state", json()), prefix + "state");
  const json rules = m.value("null_cond", json::object());  // a named copy: items() of a temporary dangles
  for (const auto& [name, rule] : rules.items()) {
    if (!rule.is_string() || (rule != "zeros" && rule != "ones" && rule != "same")) malformed(directory, prefix + "null_cond." + name);
    p.null_cond[name] = rule.get<std::string>();
  }
  const json& listed = m.value("segments", json());
  if (!listed.is_array() || listed.empty()) malformed(directory, prefix + "segments should be a non-empty list");
  for (size_t k = 0; k < listed.size(); ++k) {
    const json& s = listed[k];
    const std::string here = prefix + "segments[" + std::to_string(k) + "]";
    Segment segment;
    segment.name = field<std::string>(directory, s, "name", here);
    segment.kind = s.value("kind", std::string("step"));
    segment.backend = field<std::string>(directory, s, "backend", here);
    segment.files = strings(directory, s, "files", here);
    for (const auto& file : segment.files) named(file, here + ".files");
    const json dims = field<json>(directory, s, "dims", here);
    for (const auto& [dim, range] : dims.items()) {
      const auto bounds = range.get<std::vector<int64_t>>();
      if (bounds.size() != 2) malformed(directory, here + ".dims." + dim);
      segment.dims[dim] = {bounds[0], bounds[1]};
    }
    segment.inputs = s.contains("inputs") ? specs(directory, s["inputs"], here + ".inputs") : p.inputs;
    segment.state = s.contains("state") ? specs(directory, s["state"], here + ".state") : p.state;
    segment.build = s.value("build", json());
    if (segment.kind == "split") {
      segment.flag = field<std::string>(directory, s, "flag", here);
      for (const json& part_json : field<json>(directory, s, "parts", here)) {
        Part part{field<std::string>(directory, part_json, "name", here + ".parts"), strings(directory, part_json, "files", here + ".parts"), {}, {}};
        for (const auto& spec : specs(directory, part_json.value("inputs", json::array()), here + ".parts.inputs")) part.inputs.push_back(spec.name);
        for (const auto& spec : specs(directory, part_json.value("outputs", json::array()), here + ".parts.outputs")) part.outputs.push_back(spec.name);
        for (const auto& file : part.files) named(file, here + ".parts.files");
        segment.parts.push_back(part);
      }
    } else if (segment.kind != "step") {
      malformed(directory, here + ".kind should be step or split");
    }
    p.segments.push_back(segment);
  }
}

}  // namespace

Bundle::Bundle(const fs::path& directory, bool verify_files) : directory_(directory) {
  if (!fs::is_directory(directory)) throw Error(directory.string() + ": not a bundle directory.");
  const fs::path manifest_path = confined(directory, "manifest.json", "the manifest");
  const fs::path checksum_path = confined(directory, "manifest.sha256", "the manifest checksum");
  if (!fs::exists(manifest_path) || !fs::exists(checksum_path))
    throw Error(directory.string() + ": manifest.json or manifest.sha256 is missing; the bundle is incomplete. Recompile it.");
  const std::string raw = read_bytes(manifest_path);
  const std::string recorded = read_bytes(checksum_path).substr(0, 64);
  if (recorded != sha256_hex(raw))
    throw Error(manifest_path.string() + ": does not match its checksum in manifest.sha256: the manifest was edited or "
                "damaged after the bundle was written, so none of its files are trusted or loaded. Copy the bundle again or "
                "recompile it.");
  try {
    manifest_ = json::parse(raw);
  } catch (const json::exception& e) {
    malformed(directory, std::string("it is not JSON (") + e.what() + ")");
  }
  if (!manifest_.is_object() || !manifest_.contains("schema_version") || !manifest_["schema_version"].is_number_integer() ||
      manifest_["schema_version"].get<int64_t>() < kMinSchemaVersion || manifest_["schema_version"].get<int64_t>() > kSchemaVersion)
    throw Error(manifest_path.string() + ": manifest schema " +
                (manifest_.is_object() && manifest_.contains("schema_version") ? manifest_["schema_version"].dump() : "(none)") +
                ", this runtime reads " + std::to_string(kMinSchemaVersion) + " to " + std::to_string(kSchemaVersion) +
                "; recompile the bundle with this vdopt.");
  const json& checksums = manifest_.value("checksums", json::object());
  if (!checksums.is_object()) malformed(directory, "checksums should map file names to sha256 digests");
  for (const auto& [name, digest] : checksums.items()) {
    const fs::path path = confined(directory, name, "the manifest's checksum name");
    if (name == "manifest.json" || name == "manifest.sha256")
      throw Error(directory.string() + ": the manifest lists " + name + " among its checksums; it was edited. Recompile.");
    if (!digest.is_string() || digest.get<std::string>().size() != 64) malformed(directory, "checksums[" + name + "] is not a sha256");
    struct stat info;
    if (lstat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode))
      throw Error(path.string() + ": listed in the manifest but missing (or not a regular file); the bundle is incomplete. "
                  "Copy it again or recompile it.");
    if (verify_files && sha256_file(path) != digest.get<std::string>())
      throw Error(path.string() + ": does not match its checksum in the manifest: the file was changed after the bundle was "
                  "written, so the bundle is not loaded. Copy it again or recompile it.");
  }

  for (const auto& entry : fs::recursive_directory_iterator(directory)) {  // nothing unlisted rides along
    const std::string name = fs::relative(entry.path(), directory).generic_string();
    if (entry.is_symlink())
      throw Error(directory.string() + ": '" + name + "' is a symbolic link; a bundle holds its own real files. Copy it with "
                  "symlinks resolved (cp -rL) or recompile it.");
    if (entry.is_regular_file() && name != "manifest.json" && name != "manifest.sha256" && !checksums.contains(name))
      throw Error(directory.string() + ": '" + name + "' is in the bundle but not in its manifest; a bundle holds only "
                  "the files its manifest checksums. Remove it, or recompile the bundle.");
  }

  family = field<std::string>(directory, manifest_, "family", "manifest");
  const auto named = [&](const std::string& name, const std::string& where) {
    confined(directory, name, "the manifest's " + where);
    if (!checksums.contains(name))
      throw Error(directory.string() + ": " + where + " names '" + name + "', which has no entry in the manifest's checksums, "
                  "so it cannot be verified and will not be loaded. The manifest was edited; recompile the bundle.");
  };
  parse_program(directory, manifest_, "manifest", true, named, *this);
  const json& libraries = manifest_.value("op_libraries", json::array());
  for (size_t k = 0; k < libraries.size(); ++k) {
    const std::string where = "op_libraries[" + std::to_string(k) + "].file";
    op_libraries.push_back(field<std::string>(directory, libraries[k], "file", "op_libraries[" + std::to_string(k) + "]"));
    named(op_libraries.back(), where);
  }
  if (manifest_.contains("custom_ops")) custom_ops = field<std::vector<std::string>>(directory, manifest_, "custom_ops", "manifest");
  if (manifest_.contains("prompt_encoder") && !manifest_["prompt_encoder"].is_null()) {
    const json& encoder = manifest_["prompt_encoder"];
    PromptEncoder parsed{field<std::string>(directory, encoder, "file", "prompt_encoder"),
                         field<std::vector<std::string>>(directory, encoder, "attrs", "prompt_encoder"),
                         field<std::map<std::string, std::vector<std::string>>>(directory, encoder, "vocabulary", "prompt_encoder"),
                         field<std::vector<std::string>>(directory, encoder, "outputs", "prompt_encoder")};
    named(parsed.file, "prompt_encoder.file");
    for (const auto& attribute : parsed.attrs)
      if (!parsed.vocabulary.count(attribute)) malformed(directory, "prompt_encoder.vocabulary lacks " + attribute);
    prompt_encoder = parsed;
  }
  if (!manifest_.contains("stages")) return;
  const json& listed = manifest_["stages"];
  if (manifest_["schema_version"].get<int64_t>() < 3 || !listed.is_array() || listed.empty())
    malformed(directory, "stages should be a non-empty list (schema 3)");
  std::set<std::string> outputs_so_far;
  for (size_t k = 0; k < listed.size(); ++k) {
    const std::string here = "stages[" + std::to_string(k) + "]";
    Stage stage;
    stage.name = field<std::string>(directory, listed[k], "name", here);
    stage.kind = field<std::string>(directory, listed[k], "kind", here);
    stage.output = field<std::string>(directory, listed[k], "output", here);
    stage.feeds = field<std::map<std::string, std::string>>(directory, listed[k], "feeds", here);
    stage.noise_offset = listed[k].contains("noise_offset") ? field<int64_t>(directory, listed[k], "noise_offset", here) : 0;
    if (stage.kind != "loop" && stage.kind != "call") malformed(directory, here + ".kind should be loop or call");
    if (stage.noise_offset < 0) malformed(directory, here + ".noise_offset should be a non-negative int");
    for (const auto& [input, source] : stage.feeds)
      if (!outputs_so_far.count(source)) malformed(directory, here + ".feeds." + input + " names no earlier stage's output");
    parse_program(directory, listed[k], here, stage.kind == "loop", named, stage.program);
    outputs_so_far.insert(stage.output);
    stages.push_back(std::move(stage));
  }
}

fs::path Bundle::file(const std::string& name) const {
  if (!manifest_["checksums"].contains(name))
    throw Error(directory_.string() + ": '" + name + "' is not a checksummed file of the bundle.");
  return confined(directory_, name, "a bundle file");
}

}  // namespace vdopt
