"""`vdopt eval`: judge a bundle (or the reference teacher) with the evaluation suite.

    vdopt eval [BUNDLE] [--against BUNDLE] --prompts N [--quick] [--steps 50] [--guidance G]
               [--naive-steps K] [--cache DIR] [--json out.json] [--sheet out.png]

BUNDLE omitted or ``teacher``: the shipped reference teacher, sampled by
``vdopt.reference.sample`` at ``--steps`` (or ``--naive-steps``) steps. ``--against``
names the reference for PSNR / SSIM / FVD-MS between the two (``teacher`` = the teacher
at ``--steps`` steps); by default, when BUNDLE is not the plain teacher, the reference
is the 50-step teacher.

``vdopt.cli`` calls :func:`register`; ``python -m vdopt.eval`` runs it standalone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vdopt.errors import VdoptError
from vdopt.validate import PROMPT_SET_SEED_LIMIT, check_outputs, check_seed

from vdopt.eval import suite

TEACHER = "teacher"


def generate_from_bundle(path: str | Path, device: str = "cpu"):
    """A ``generate_fn(prompts, seeds)`` that runs a compiled bundle through ``vdopt.runtime.Session``.

    Each clip is one ``Session.run`` call with the bundle's own prompt encoder and the
    clip's seed, so clip *i* depends only on (prompt *i*, seed *i*) as the suite requires.
    """
    from vdopt.runtime import Session

    session = Session(path, device=device)
    encoder = session.prompt_encoder()
    if encoder is None:
        raise RuntimeError(f"bundle {path} carries no prompt encoder, so it cannot be given text prompts to evaluate")

    def fn(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        outs = []
        for p, s in zip(prompts, seeds):
            cond, uncond = encoder(p)
            x = session.run(cond, uncond, seed=int(s), progress=False)
            outs.append(x if x.dim() == 5 else x.unsqueeze(0))
        return torch.cat(outs).float().clamp(-1, 1)

    return fn


def cached(fn, label: str, cache_dir: str | Path | None):
    """Wrap a generate_fn so each (label, prompts, seeds) batch is stored in / reused from ``cache_dir``."""
    if cache_dir is None:
        return fn
    import hashlib

    from safetensors.torch import load_file, save_file

    d = Path(cache_dir)
    d.mkdir(parents=True, exist_ok=True)

    def wrapped(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        key = hashlib.sha1(repr((label, list(prompts), [int(s) for s in seeds])).encode()).hexdigest()[:20]
        f = d / f"{key}.safetensors"
        if f.exists():
            return load_file(str(f))["video"]
        v = fn(prompts, seeds).float().cpu().contiguous()
        save_file({"video": v}, str(f))
        return v

    return wrapped


def file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


def generator_for(name: str | None, steps: int, guidance: float | None, device: str):
    """(generate_fn, label, cache label) for a bundle path or the teacher. The cache label names the
    weights (or the bundle's manifest) by content, so retrained weights never reuse stale clips."""
    if name in (None, TEACHER):
        from vdopt.reference.model import DEFAULT_GUIDANCE, WEIGHTS_DIR, WEIGHTS_FILE, load_reference

        t, c = load_reference(device=device)
        g = DEFAULT_GUIDANCE if guidance is None else guidance
        label = f"teacher@{steps}steps,g={g:g}"
        return suite.teacher_generate_fn(t, c, steps=steps, guidance_scale=g), label, f"{label}#{file_digest(WEIGHTS_DIR / WEIGHTS_FILE)}"
    generate = generate_from_bundle(name, device=device)
    return generate, Path(name).name, f"{Path(name).name}#{file_digest(Path(name) / 'manifest.json')}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", nargs="?", default=None, help="bundle directory, or 'teacher' (default)")
    p.add_argument("--against", default=None, help="reference: a bundle or 'teacher' (PSNR/SSIM/FVD-MS against it)")
    p.add_argument("--prompts", type=int, default=None, help=f"number of clips (default {suite.FULL_N}; --quick: {suite.QUICK_N})")
    p.add_argument("--quick", action="store_true", help=f"CI size: {suite.QUICK_N} clips")
    p.add_argument("--steps", type=int, default=50, help="teacher sampling steps (default 50)")
    p.add_argument("--naive-steps", type=int, default=None, help="evaluate the teacher at this many steps (naive reduction)")
    p.add_argument("--guidance", type=float, default=None, help="teacher guidance scale (default: the model card's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cache", default=None, help="directory to store/reuse generated clips (keyed by generator, prompts, seeds)")
    p.add_argument("--json", dest="json_path", default=None, help="write the metrics here")
    p.add_argument("--sheet", dest="sheet_path", default=None, help="write a PNG contact sheet here")


def run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise VdoptError(f"--threads {args.threads}: give a positive number of CPU threads.")
    if args.threads:
        torch.set_num_threads(args.threads)
    from vdopt.runtime.session import check_device

    check_device(args.device)  # the teacher is built on it before any bundle would check it
    if args.prompts is not None and args.prompts < 1:
        raise VdoptError(f"--prompts {args.prompts}: the evaluation needs at least one clip.")
    check_seed(args.seed, limit=PROMPT_SET_SEED_LIMIT)
    check_outputs(("--json", args.json_path), ("--sheet", args.sheet_path))
    n = args.prompts or (suite.QUICK_N if args.quick else suite.FULL_N)
    main_steps = args.naive_steps or args.steps
    gen, label, cache_label = generator_for(args.bundle, main_steps, args.guidance, args.device)
    gen = cached(gen, cache_label, args.cache)
    ref_fn, ref_label = None, "real"
    against = args.against
    if against is None and (args.bundle not in (None, TEACHER) or args.naive_steps):
        against = TEACHER
    if against is not None:
        ref_fn, ref_label, ref_cache_label = generator_for(against, args.steps, args.guidance, args.device)
        ref_fn = cached(ref_fn, ref_cache_label, args.cache)
    result = suite.evaluate(gen, n, args.seed, reference_fn=ref_fn, batch=args.batch, json_path=args.json_path,
                            sheet_path=args.sheet_path, label=label, reference_label=ref_label)
    print(f"vdopt eval: {label}" + (f" against {ref_label}" if ref_fn else "") + f", {n} clips")
    for line in suite.summary_lines(result):
        print("  " + line)
    if args.json_path:
        print(f"wrote {args.json_path}")
    if args.sheet_path:
        print(f"wrote {args.sheet_path}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an argparse subparsers object (``set_defaults(func=run)``)."""
    p = subparsers.add_parser("eval", help="evaluate a bundle or the reference teacher on moving-shapes prompts",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vdopt")
    sub = ap.add_subparsers(dest="command", required=True)
    register(sub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
