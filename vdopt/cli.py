"""The `vdopt` command line: compile, run, inspect, schema, eval, calibrate, prune, distill.

Errors a user can cause are `VdoptError`s: printed as one paragraph, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vdopt.errors import VdoptError


def cmd_compile(args: argparse.Namespace) -> int:
    from vdopt.compiler import compile_bundle
    from vdopt.recipe import load_recipe, parse_recipe

    recipe = args.recipe
    if args.kernel_profile:
        data = load_recipe(args.recipe).model_dump(mode="json")
        recipe = parse_recipe({**data, "lower": {**data["lower"], "kernel_profile": True}}, args.recipe)
    manifest = compile_bundle(recipe, args.model, args.output, trust_pickle=args.trust_pickle, trust_code=args.trust_code,
                              dump_ir=args.dump_ir, force=args.force, verify=args.verify, log=lambda m: print(f"[vdopt] {m}", file=sys.stderr))
    seconds = sum(p["seconds"] for s in manifest["segments"] for p in s["passes"])
    stages = manifest.get("stages") or []
    staged = f"{len(stages)} stages ({' -> '.join(s['name'] for s in stages)}), " if stages else ""
    print(f"wrote {args.output}: {staged}{len(manifest['segments'])} segment(s), backend {manifest['segments'][0]['backend']}, "
          f"{manifest['num_steps']} steps, passes {', '.join(p['name'] for p in manifest['passes']) or 'none'} ({seconds:.2f} s)")
    if manifest.get("verify"):
        from vdopt.verify import summary

        print(f"verified on {manifest['verify']['prompts']} prompt(s) against the unoptimised program: {summary(manifest['verify'])}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from vdopt.runtime import Session
    from vdopt.runtime.trace import CacheTrace
    from vdopt.validate import check_finite_output, check_run_args
    from vdopt.video import load_cond, save_output

    check_run_args(args)
    session = Session(args.bundle, device=args.device, trust_code=args.trust_code)
    cond, uncond = load_cond(session, args.cond, args.prompt)
    trace = CacheTrace(session.manifest) if args.trace else None
    video = session.run(cond, uncond, seed=args.seed, frames=args.frames, height=args.height, width=args.width,
                        progress=not args.quiet, on_step=trace.on_step if trace else None)
    check_finite_output(video)
    save_output(video, args.output, session.manifest)
    print(f"wrote {args.output} {list(video.shape)}")
    if trace:
        trace.write(args.trace)
        print(f"wrote {args.trace}: body evaluations per row {trace.body_evaluations()} of {session.num_steps} steps")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from vdopt.runtime import Session
    from vdopt.runtime.profile import nsys_stats, nsys_table, profile_bundle
    from vdopt.validate import check_output_path
    from vdopt.video import load_cond

    out = Path(args.output)
    check_output_path(out / "profile.json", "-o", (".json",))
    if args.threads:
        torch.set_num_threads(args.threads)
    session = Session(args.bundle, device=args.device, profile=True, trust_code=args.trust_code)
    cond, uncond = load_cond(session, args.cond, args.prompt)
    out.mkdir(parents=True, exist_ok=True)
    profile = profile_bundle(session, cond, uncond, seed=args.seed, chrome_trace=out / "trace.json",
                             log=lambda m: print(f"[vdopt] {m}", file=sys.stderr))
    report = profile.to_json(args.depth)
    print(profile.table(args.depth, args.top, args.per_block))
    if args.nsys:
        inner = [a for a in (args.argv or []) if a != "--nsys"]
        report["nsys"] = nsys_stats([*inner, "-o", str(out / "under_nsys")], out)
        print(nsys_table(report["nsys"], args.top))
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    plotted = profile.plot(out / "profile.png", args.depth, per_block=args.per_block)
    print(f"wrote {out / 'profile.json'}, {out / 'trace.json'} (chrome://tracing, Perfetto)"
          + (f", {out / 'profile.png'}" if plotted else " (no PNG: pip install matplotlib)"))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from vdopt.inspect import describe

    print(describe(Path(args.path), graph=args.graph))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from vdopt.recipe import recipe_schema
    from vdopt.validate import check_output_path

    text = json.dumps(recipe_schema(), indent=2)
    if args.output:
        check_output_path(args.output, "-o", (".json",))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdopt", description="Compile video diffusion denoisers into fast bundles.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="recipe + model -> bundle")
    p.add_argument("recipe")
    p.add_argument("model", nargs="?", help="checkpoint (.safetensors/.pt state dict), diffusers folder, or .pt2; omitted: random weights")
    p.add_argument("-o", "--output", required=True, help="bundle directory to write, e.g. out.vdopt")
    p.add_argument("--trust-pickle", action="store_true", help="allow running code from the model file: a pickled nn.Module, or a .pt2 whose pickles, "
                        "size strings or guards are not plain data (only for files you trust)")
    p.add_argument("--trust-code", action="store_true", help="allow a model.family given as module.path:ATTRIBUTE: importing "
                                                            "it runs that module's code (installed vdopt.families entry "
                                                            "points need no flag)")
    p.add_argument("--dump-ir", metavar="DIR", help="write a readable graph after every pass")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the bundle against the unoptimised program on the recipe's verify.prompts and refuse to "
                        "write it if it misses the verify: budget (default: when the recipe states a budget)")
    p.add_argument("--kernel-profile", action="store_true",
                   help="aoti: compile the kernels with profiler records (lower.kernel_profile), for `vdopt profile`'s "
                        "per-module table; they slow every kernel call a little, small graphs most")
    p.add_argument("--force", action="store_true", default=False,
                   help="replace an existing bundle at -o (swapped in atomically once the new one is complete); "
                        "without it an existing bundle is refused. Files and non-bundle directories are never replaced")
    p.add_argument("--no-force", dest="force", action="store_false", help="refuse to replace an existing bundle (the default)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="generate with a bundle")
    p.add_argument("bundle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cond", help="safetensors/.pt file of conditioning tensors named as in the manifest (cond.* / uncond.*)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt, for bundles that carry a prompt encoder (the reference model); repeat it to generate "
                        "several in one batched run (sample k uses seed + k; the clips are written side by side)")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-code", action="store_true", help="allow loading a family given as module.path:ATTRIBUTE "
                                                            "(only needed for its prompt encoder)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--trace", metavar="FILE.json", help="record cache decisions per step and row (and a .png plot beside it)")
    p.add_argument("-o", "--output", required=True, help="out.pt | out.safetensors | out.gif | out.mp4")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("profile", help="where a generation's time goes: per step, cache decision, part and module path")
    p.add_argument("bundle")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="as for run (repeat for a batch)")
    p.add_argument("--cond", help="as for run: conditioning tensors named as in the manifest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--trust-code", action="store_true", help="as for run")
    p.add_argument("--depth", type=int, help="group module paths by their first N names (default: full paths)")
    p.add_argument("--top", type=int, default=15, help="modules listed in the table")
    p.add_argument("--per-block", action="store_true", help="a row per block (default: the same module of every block is one row)")
    p.add_argument("--nsys", action="store_true", help="also run under Nsight Systems (nsys profile -t cuda,nvtx) and fold "
                                                        "`nsys stats` NVTX-range and GPU-kernel summaries into the table")
    p.add_argument("-o", "--output", default="profile", help="directory for profile.json, trace.json, profile.png")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("inspect", help="show a bundle (passes, timings, segments, state, I/O) or a .pt2's module structure")
    p.add_argument("path")
    p.add_argument("--graph", action="store_true", help="list the module classes and block paths found in the graph")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("schema", help="print the recipe JSON schema (for editors)")
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_schema)

    try:
        from vdopt.eval.cli import register as register_eval
    except ImportError:
        pass
    else:
        register_eval(sub)
    from vdopt.distill.cli import register as register_distill

    register_distill(sub)
    from vdopt.calibrate import register as register_calibrate

    register_calibrate(sub)
    from vdopt.prune import register as register_prune

    register_prune(sub)
    return parser


def run_guarded(command: str, func, args: argparse.Namespace) -> int:
    try:
        return func(args)
    except VdoptError as exc:
        print(f"vdopt {command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


def standalone(command: str, description: str, add_arguments, func, argv: list[str] | None = None) -> int:
    """`python -m vdopt.<module>` for a subcommand: same arguments, same error handling."""
    parser = argparse.ArgumentParser(prog=f"vdopt {command}", description=description)
    add_arguments(parser)
    return run_guarded(command, func, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # the subcommand's own arguments, for re-running it (profile --nsys)
    return run_guarded(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
