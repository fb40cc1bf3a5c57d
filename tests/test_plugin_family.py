"""A diffusers video transformer vdopt ships no descriptor for (SANA-Video), made a family by the guide's own
descriptor (docs/adding_a_family.md), compiled from a recipe, cached, and run in fresh processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from vdopt.errors import CaptureError, RecipeError
from vdopt.families import load_family, registry
from vdopt.recipe import parse_recipe
from vdopt.sampler import diffusers_scheduler

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "adding_a_family.md"
INPUT = {"batch": {"min": 1, "max": 2}, "frames": {"min": 1, "max": 4}, "height": 8, "width": 8, "text_len": 6}
SAMPLER = {"kind": "flow_euler", "steps": 8, "shift": 3.0, "guidance_scale": 4.0}
THRESHOLD = 0.05


def guide_module() -> str:
    """The guide's descriptor, as written in the guide."""
    (block,) = re.findall(r"```python\n(\"\"\"my_families.py.*?)```", GUIDE.read_text(), flags=re.S)
    return block


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """A directory holding my_families.py (the guide's code) and a distribution declaring it as a
    `vdopt.families` entry point, the way `pip install` of a plugin package leaves it."""
    directory = tmp_path_factory.mktemp("plugin")
    (directory / "my_families.py").write_text(guide_module())
    dist = directory / "my_families-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-families\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vdopt.families]\nsana_video = my_families:SANA_VIDEO\n")
    return directory


def vdopt_cli(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-m", "vdopt.cli", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def setup(plugin, tmp_path_factory):
    """The model's weights, a conditioning file (two prompts), and the eager model."""
    sys.path.insert(0, str(plugin))
    try:
        descriptor = load_family("my_families:SANA_VIDEO", trust_code=True)
    finally:
        sys.path.remove(str(plugin))
    directory = tmp_path_factory.mktemp("sana")
    torch.manual_seed(0)
    model = descriptor.build(dict(descriptor.tiny_config)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    generator = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(2, 6, 16, generator=generator),
            "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])}
    save_file({f"cond.{k}": v.contiguous() for k, v in cond.items()}, str(directory / "cond.safetensors"))
    return directory, model, cond


def write_recipe(path: Path, family: str, passes: list) -> Path:
    path.write_text(yaml.safe_dump({"model": {"family": family, "input": INPUT}, "sampler": SAMPLER, "passes": passes,
                                    "lower": {"backend": "aoti"}}))
    return path


@torch.no_grad()
def eager_loop(model, cond: dict, seed: int, frames: int, threshold: float | None) -> tuple[torch.Tensor, int]:
    """The plain diffusers loop, with the unconditional branch as zeros and an all-ones mask; with `threshold`, a
    first-block cache written out here independently of vdopt's pass: per row, block 0's residual is the probe, and
    a row recomputes blocks 1.. when the probe's relative L1 change since its last recompute reaches the threshold
    (always on the first and last step and after 4 reuses), else adds its cached residual. Returns the latent and
    the number of (row, step) reuses."""
    recipe = parse_recipe({"model": {"family": "wan", "input": INPUT}, "sampler": SAMPLER})
    scheduler = diffusers_scheduler(recipe.sampler)
    batch = cond["encoder_hidden_states"].shape[0]
    noise = [torch.randn(4, frames, 8, 8, generator=torch.Generator().manual_seed(seed + k)) for k in range(batch)]
    x = torch.stack(noise)
    both = {"encoder_hidden_states": torch.cat([cond["encoder_hidden_states"], torch.zeros_like(cond["encoder_hidden_states"])]),
            "encoder_attention_mask": torch.cat([cond["encoder_attention_mask"], torch.ones_like(cond["encoder_attention_mask"])])}
    blocks = model.transformer_blocks
    rows = 2 * batch
    state = {"prev": None, "cache": None, "run": torch.zeros(rows, dtype=torch.int64), "mask": None, "reuses": 0}

    def probe_hook(module, args, output):
        probe = output - args[0]
        prev = state["prev"] if state["prev"] is not None else torch.zeros_like(probe)
        distance = (probe - prev).abs().flatten(1).mean(1) / prev.abs().flatten(1).mean(1).clamp(min=1e-12)
        forced = torch.full((rows,), step in (0, len(scheduler.timesteps) - 1)) | (state["run"] >= 4)
        mask = forced | (distance >= threshold)
        state["mask"], state["prev"] = mask, torch.where(mask[:, None, None], probe, prev)
        state["body_in"] = output

    def body_end_hook(module, args, output):
        mask, body_in = state["mask"], state["body_in"]
        fresh = output - body_in
        cache = state["cache"] if state["cache"] is not None else torch.zeros_like(fresh)
        state["cache"] = torch.where(mask[:, None, None], fresh, cache)
        state["run"] = torch.where(mask, 0, state["run"] + 1)
        state["reuses"] += int((~mask).sum())
        return body_in + state["cache"]

    hooks = []
    if threshold is not None:
        hooks = [blocks[0].register_forward_hook(probe_hook), blocks[-1].register_forward_hook(body_end_hook)]
    try:
        for step, t in enumerate(scheduler.timesteps):
            out = model(hidden_states=torch.cat([x, x]), timestep=t.expand(rows), return_dict=False, **both)[0]
            out_cond, out_uncond = out.chunk(2)
            x = scheduler.step(out_uncond + SAMPLER["guidance_scale"] * (out_cond - out_uncond), t, x, return_dict=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    return x, state["reuses"]


@pytest.mark.parametrize("route, family, cache", [
    ("module path", "my_families:SANA_VIDEO", False),
    ("entry point", "sana_video", True),
])
def test_an_unshipped_diffusers_class_compiles_caches_and_runs_in_a_fresh_process(plugin, setup, tmp_path, route, family,
                                                                                     cache):
    directory, model, cond = setup
    passes = [{"name": "insert_cache", "params": {"policy": "first_blocks", "threshold": THRESHOLD}}] if cache else []
    recipe = write_recipe(tmp_path / "recipe.yaml", family, passes)
    bundle = tmp_path / "sana.vdopt"
    trust = ["--trust-code"] if route == "module path" else []
    done = vdopt_cli("compile", str(recipe), str(directory / "model.safetensors"), "-o", str(bundle), *trust,
                     pythonpath=plugin)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["family"] == family
    assert manifest["null_cond"] == {"encoder_hidden_states": "zeros", "encoder_attention_mask": "ones"}
    assert manifest["family_origin"]["kind"] == ("code_reference" if route == "module path" else "entry_point")
    for frames in (2, 4):
        out = tmp_path / f"out_{frames}.pt"
        # a fresh process that cannot import the plugin: the manifest carries what running needs
        done = vdopt_cli("run", str(bundle), "--cond", str(directory / "cond.safetensors"), "--seed", "3",
                         "--frames", str(frames), "--quiet", "-o", str(out))
        assert done.returncode == 0, done.stderr
        expected, reuses = eager_loop(model, cond, 3, frames, THRESHOLD if cache else None)
        torch.testing.assert_close(torch.load(out), expected, atol=1e-4, rtol=0)
        if cache:
            assert 0 < reuses < 2 * 2 * SAMPLER["steps"], "the cache reused some rows' steps and computed others"


def test_a_module_path_family_needs_trust_code(plugin, setup, tmp_path):
    directory, _, _ = setup
    recipe = write_recipe(tmp_path / "recipe.yaml", "my_families:SANA_VIDEO", [])
    done = vdopt_cli("compile", str(recipe), "-o", str(tmp_path / "b"), pythonpath=plugin)
    assert done.returncode == 2 and "--trust-code" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("family, message", [
    ("no_such_module:X", "cannot import no_such_module"),
    ("json:NOTHING", "json has no attribute 'NOTHING'"),
    ("json:dumps", "is a function, not an ArchitectureDescriptor"),
])
def test_a_bad_module_path_is_one_message(family, message):
    with pytest.raises(CaptureError, match=message):
        load_family(family, trust_code=True)
    assert family not in registry()


@pytest.mark.parametrize("family, message", [("wna", "did you mean 'wan'"), ("os.system", "not a known family"),
                                             ("a:b:c", "not a known family")])
def test_an_unknown_family_is_refused_by_the_recipe(family, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"model": {"family": family, "input": INPUT}})


@pytest.mark.parametrize("policy", ["teacache", "adacache"])
def test_the_guide_descriptor_takes_every_cache_policy(plugin, policy):
    """Regression: teacache looked for the time embedding only ahead of the body's first node, which export hoists
    (a size read of block 0 far ahead of the time embedding), so the guide's descriptor was refused."""
    from vdopt.compiler import compile_program

    sys.path.insert(0, str(plugin))
    try:
        load_family("my_families:SANA_VIDEO", trust_code=True)
    finally:
        sys.path.remove(str(plugin))
    recipe = parse_recipe({"model": {"family": "my_families:SANA_VIDEO", "input": INPUT}, "sampler": {"steps": 3},
                           "passes": [{"name": "insert_cache", "params": {"policy": policy}}]})
    cached = compile_program(recipe, None)
    assert cached.extras["cache"]["policy"] == policy and cached.state
    assert cached.extras["cache"]["gather_rows"] or "gather_rows_failed" in cached.extras["cache"]
