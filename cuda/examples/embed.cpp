// A C++ app that embeds a vdopt bundle: conditioning in, latent out, through libvdopt_runtime.
//
//   embed BUNDLE COND.safetensors [SEED]
//
// Build (see cuda/examples/CMakeLists.txt): the runtime's CMake package is its source tree.
#include <iostream>
#include <string>

#include "vdopt/session.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: embed BUNDLE COND.safetensors [SEED]\n";
    return 2;
  }
  try {
    // Opening verifies the manifest, every checksum and every path before any of the bundle's code is loaded.
    vdopt::Session session(argv[1], "cpu");
    const vdopt::Bundle& bundle = session.bundle();
    std::cout << bundle.family << " bundle, " << bundle.num_steps << " steps, "
              << (bundle.guidance ? "guided" : "unguided") << ", " << bundle.segments.size() << " segment(s)\n";

    // Conditioning tensors by name; the unconditional branch (if any) follows the manifest's null rules.
    const vdopt::Tensors cond = vdopt::read_safetensors(argv[2]);
    vdopt::RunOptions options;
    options.seed = argc > 3 ? std::stoll(argv[3]) : 0;

    const at::Tensor latent = session.run(cond, nullptr, options);
    std::cout << "latent " << latent.sizes() << ", mean " << latent.mean().item<float>() << ", std "
              << latent.std().item<float>() << "\n";
    vdopt::write_safetensors("latent.safetensors", {{"latent", latent}});
    return 0;
  } catch (const vdopt::Error& error) {  // a bundle or input problem: one paragraph
    std::cerr << "embed: " << error.what() << "\n";
    return 2;
  }
}
