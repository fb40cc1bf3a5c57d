"""vdopt: a compiler for video diffusion denoisers.

The compiled unit is one denoising step (see ARCHITECTURE.md, contract 1); everything else —
passes, backends, the bundle and the runtime loop — is built around that program.
"""

__version__ = "0.1.0"
