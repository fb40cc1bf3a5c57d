"""The CMD form (issue 21): rewrite_content_motion, staged bundles, `vdopt distill --method cmd`.

- The pass: the content stage is the captured family at one frame without its temporal blocks, the motion stage
  takes the content frame, the decode stage is one call; idempotent; refuses what it cannot rewrite.
- Staged bundles: every stage against its eager reference (vdopt.cmd.sample, <= 1e-5) and the whole bundle on the
  torch, AOTInductor and ONNX Runtime backends, `inspect` lists the stages, an edited stage is refused, a schema 2
  (one-stage) bundle still opens.
- Distillation: a tiny configuration end to end (trajectories, three training stages, export, compile, run), and a
  stage killed mid-way resumes to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cmd_helpers import random_cmd_file
from test_security import reseal
from vdopt.bundle import read_manifest
from vdopt.capture import capture
from vdopt.cmd.sample import CMDGenerator
from vdopt.compiler import compile_bundle
from vdopt.errors import BundleError, LoweringError, PassError, RunInputError
from vdopt.inspect import describe
from vdopt.module_stack import module_stack
from vdopt.pass_manager import PassManager
from vdopt.passes import load_pass
from vdopt.recipe import parse_recipe
from vdopt.reference.model import WEIGHTS_DIR, WEIGHTS_FILE
from vdopt.runtime.session import Session
from vdopt.safety import UnsafeInputError

TEACHER = WEIGHTS_DIR / WEIGHTS_FILE
PROMPTS = ["red circle moving up", "blue square moving down-left"]
STEPS = 3
MOTION_GUIDANCE = 2.0  # the motion loop's own scale, recorded in the weights; the sampler's is 3


def cmd_recipe(weights: Path, backend: str = "torch", batch: int | dict = {"min": 1, "max": 2}) -> dict:  # noqa: B006
    return {"model": {"family": "reference", "input": {"batch": batch, "frames": 8, "height": 32, "width": 32, "text_len": 3}},
            "sampler": {"kind": "flow_euler", "steps": STEPS, "guidance_scale": 3.0},
            "lower": {"backend": backend},
            "passes": [{"name": "rewrite_content_motion", "params": {"weights": str(weights)}}]}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return random_cmd_file(tmp_path_factory.mktemp("cmd") / "cmd.safetensors", info={"motion_guidance": MOTION_GUIDANCE})


@pytest.fixture(scope="module")
def captured():
    return capture(parse_recipe(cmd_recipe(Path("unused"))), TEACHER)


@pytest.fixture(scope="module")
def rewritten(captured, weights):
    return PassManager([(load_pass("rewrite_content_motion"), {"weights": str(weights)})]).run(captured)


@pytest.fixture(scope="module")
def bundles(weights, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bundles")
    made = {}
    for backend in ("torch", "aoti", "onnx"):
        compile_bundle(parse_recipe(cmd_recipe(weights, backend)), TEACHER, out / f"{backend}.vdopt")
        made[backend] = out / f"{backend}.vdopt"
    return made


@pytest.fixture(scope="module")
def eager(weights) -> CMDGenerator:
    return CMDGenerator(weights, steps=STEPS, guidance_scale=3.0)


# ----- the pass ----------------------------------------------------------------------------------

def module_paths(ep) -> set[str]:
    return {fqn for node in ep.graph.nodes for fqn, _ in module_stack(node)}


def test_the_content_stage_is_the_family_at_one_frame_without_temporal_blocks(captured, rewritten):
    before, after = module_paths(captured.ep), module_paths(rewritten.ep)
    temporal = {p for p in before if captured.descriptor.is_temporal_block(p.removeprefix("denoiser.model."))}
    assert temporal and not temporal & after
    assert not any("temporal_transformer_blocks" in k for k in rewritten.ep.state_dict)
    assert rewritten.inputs[0].shape[2] == 1 and captured.inputs[0].shape[2] == 8
    assert [s.name for s in rewritten.inputs] == [s.name for s in captured.inputs]


def test_the_motion_stage_takes_the_content_frame_and_the_decode_stage_is_one_call(rewritten):
    motion, decode = rewritten.extras["stages"]
    assert (motion.name, motion.kind, decode.name, decode.kind) == ("motion", "loop", "decode", "call")
    names = [s.name for s in motion.program.inputs]
    assert names == ["x", "i", "cond.encoder_hidden_states", "cond.content", "uncond.encoder_hidden_states", "uncond.content"]
    assert motion.feeds == {"cond.content": "content"} and decode.feeds == {"content": "content", "motion": "motion"}
    assert [s.name for s in decode.program.outputs] == ["clip"] and decode.program.outputs[0].shape[1:] == (3, 8, 32, 32)
    assert motion.program.descriptor.null_rules()["content"] == "same"


def test_the_rewrite_is_idempotent(rewritten, weights):
    again = PassManager([(load_pass("rewrite_content_motion"), {"weights": str(weights)})]).run(rewritten)
    assert again.ep is rewritten.ep and again.extras["stages"] is rewritten.extras["stages"]


def test_missing_or_foreign_weights_are_refused(captured, tmp_path):
    with pytest.raises(PassError, match="not found"):
        load_pass("rewrite_content_motion").run(captured, weights=str(tmp_path / "none.safetensors"))
    with pytest.raises(PassError, match="not a CMD weights file"):
        load_pass("rewrite_content_motion").run(captured, weights=str(TEACHER))


def test_the_rewrite_after_a_cache_is_refused(captured, weights):
    cached = PassManager([(load_pass("insert_cache"), {"policy": "first_blocks"})]).run(captured)
    with pytest.raises(PassError, match="uncached"):
        PassManager([(load_pass("rewrite_content_motion"), {"weights": str(weights)})]).run(cached)


# ----- staged bundles ----------------------------------------------------------------------------

def encode(session: Session):
    return session.prompt_encoder()(PROMPTS)


@pytest.mark.parametrize("backend", ["torch", "aoti", "onnx"])
def test_each_stage_equals_its_eager_reference(bundles, eager, backend):
    session = Session(bundles[backend])
    cond, uncond = encode(session)
    content_stage, motion_stage, decode_stage = (session.stage(e) for e in session.stages)
    assert [entry["sampler"]["guidance_scale"] for entry in session.stages[:2]] == [3.0, MOTION_GUIDANCE] == [3.0, eager.motion_guidance]
    c, u = eager.encode(PROMPTS)
    content = content_stage.run(cond, uncond, seed=5, progress=False)
    torch.testing.assert_close(content, eager.content(c, u, 5), atol=1e-5, rtol=1e-5)
    motion = motion_stage.run({**cond, "content": content}, {**uncond, "content": content}, seed=5 + session.stages[1]["noise_offset"],
                              progress=False)
    torch.testing.assert_close(motion, eager.motion(c, u, content, 5), atol=1e-5, rtol=1e-5)
    segment = session.stages[2]["segments"][0]
    clip = decode_stage.runner(segment)(content, motion)[0]
    torch.testing.assert_close(clip, eager.decode(content, motion), atol=1e-5, rtol=1e-5)
    whole = session.run(cond, uncond, seed=5, progress=False)
    assert whole.shape == (2, 3, 8, 32, 32)
    torch.testing.assert_close(whole, eager(PROMPTS, 5), atol=1e-5, rtol=1e-5)


def test_the_motion_loop_runs_at_the_guidance_its_weights_record(bundles, weights, eager):
    """(test_each_stage_equals_its_eager_reference holds the stage to the eager loop at the recorded scale.)"""
    session = Session(bundles["torch"])
    cond, uncond = encode(session)
    content = session.stage(session.stages[0]).run(cond, uncond, seed=5, progress=False)
    motion = session.stage(session.stages[1]).run({**cond, "content": content}, {**uncond, "content": content},
                                                   seed=5 + session.stages[1]["noise_offset"], progress=False)
    c, u = eager.encode(PROMPTS)
    at_sampler_scale = CMDGenerator(weights, steps=STEPS, guidance_scale=3.0)
    at_sampler_scale.motion_guidance = 3.0
    assert (motion - at_sampler_scale.motion(c, u, content, 5)).abs().max() > 1e-3  # the scale matters at these weights


@pytest.mark.parametrize("value", ["2", -1.0, float("nan"), True])
def test_a_weights_file_with_a_bad_motion_guidance_is_refused(captured, tmp_path, value):
    bad = random_cmd_file(tmp_path / "cmd.safetensors", info={"motion_guidance": value})
    with pytest.raises(PassError, match="motion_guidance should be a non-negative number"):
        PassManager([(load_pass("rewrite_content_motion"), {"weights": str(bad)})]).run(captured)


def test_a_prompt_gives_the_same_clip_alone_or_in_a_batch(bundles):
    session = Session(bundles["torch"])
    cond, uncond = encode(session)
    both = session.run(cond, uncond, seed=9, progress=False)
    alone = session.run({k: v[1:] for k, v in cond.items()}, {k: v[1:] for k, v in uncond.items()}, seed=10, progress=False)
    torch.testing.assert_close(alone[0], both[1], atol=1e-6, rtol=1e-6)


def test_on_stage_reports_every_stage_in_running_order_with_its_wall_clock(bundles):
    session = Session(bundles["torch"])
    reported: list[tuple[str, float]] = []
    start = time.perf_counter()
    session.run(*encode(session), seed=3, progress=False, on_stage=lambda name, seconds: reported.append((name, seconds)))
    elapsed = time.perf_counter() - start
    assert [name for name, _ in reported] == ["content", "motion", "decode"]
    assert all(seconds > 0 for _, seconds in reported) and sum(seconds for _, seconds in reported) <= elapsed


def test_the_runtime_fills_the_unconditional_content_itself(bundles):
    """Given an unconditional prompt, or none (the manifest's null rules), the motion stage's uncond branch sees the
    content frame as well."""
    session = Session(bundles["torch"])
    cond, uncond = encode(session)
    zeros = {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
    torch.testing.assert_close(session.run(cond, None, seed=1, progress=False), session.run(cond, zeros, seed=1, progress=False))
    with pytest.raises(RunInputError, match="runs in stages"):
        session.run(cond, uncond, frames=16, progress=False)


def test_inspect_lists_the_stages_in_running_order(bundles):
    text = describe(bundles["aoti"])
    lines = text[text.index("stages (3"):].splitlines()
    assert lines[1].lstrip().startswith("content: loop, 3 steps, guidance 3.0")
    assert lines[3].lstrip().startswith("motion: loop, 3 steps, guidance 2.0") and "cond.content <- content" in lines[3]
    assert lines[5].lstrip().startswith("decode: one call") and "output 'clip' ['batch', 3, 8, 32, 32]" in lines[5]


def test_profile_refuses_a_staged_bundle_by_name(bundles, tmp_path, capsys):
    from vdopt.cli import main as vdopt_main

    assert vdopt_main(["profile", str(bundles["torch"]), "--prompt", "red circle moving up", "-o", str(tmp_path / "p")]) == 2
    assert "runs in stages (content -> motion -> decode), which it does not attribute yet" in capsys.readouterr().err


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / bundle.name
    shutil.copytree(bundle, target)
    return target


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["stages"][1]["feeds"].update({"cond.content": "motion"}), "earlier stages' outputs"),
    (lambda m: m["stages"][2].update(kind="shell"), "kind should be one of loop, call"),
    (lambda m: m["stages"][1]["segments"][0].update(files=["../../outside.pt2"]), "outside|\\.\\."),
    (lambda m: m["stages"][1].pop("num_steps"), "lacks num_steps"),
    (lambda m: m["stages"][1]["sampler"].update(guidance_scale="2"), "sampler.guidance_scale should be a number"),
    (lambda m: m.update(schema_version=2), "schema 3"),
])
def test_an_edited_stage_is_refused(bundles, tmp_path, edit, message):
    bundle = copy_bundle(bundles["torch"], tmp_path)
    reseal(bundle, edit)
    with pytest.raises((BundleError, UnsafeInputError), match=message):
        Session(bundle)


def test_a_schema_2_bundle_still_opens(tmp_path):
    recipe = parse_recipe({"model": {"family": "reference", "input": {"batch": 1, "frames": 8, "height": 32, "width": 32, "text_len": 3}},
                           "sampler": {"kind": "flow_euler", "steps": 2, "guidance_scale": 3.0}, "lower": {"backend": "torch"}})
    compile_bundle(recipe, TEACHER, tmp_path / "one.vdopt")
    reseal(tmp_path / "one.vdopt", lambda m: m.update(schema_version=2))
    session = Session(tmp_path / "one.vdopt")
    assert read_manifest(tmp_path / "one.vdopt")["schema_version"] == 2 and not session.stages
    assert session.run(*session.prompt_encoder()("red circle moving up"), seed=0, progress=False).shape == (1, 3, 8, 32, 32)


def test_a_cache_composes_with_the_rewrite_on_the_content_stage(weights, bundles, tmp_path):
    """rewrite_content_motion, then insert_cache: one recipe, one bundle; the cache lives in the content stage (its state
    in that stage's manifest), and a cache that never reuses gives the uncached CMD clips."""
    recipe = cmd_recipe(weights)
    recipe["passes"].append({"name": "insert_cache", "params": {"policy": "first_blocks", "threshold": 0.0, "max_reuse": 1}})
    compile_bundle(parse_recipe(recipe), TEACHER, tmp_path / "cached.vdopt")
    session = Session(tmp_path / "cached.vdopt")
    content, motion, _ = session.stages
    assert any(s["name"].startswith("state.cache.") for s in content["state"]) and not motion["state"]
    cond, uncond = encode(session)
    torch.testing.assert_close(session.run(cond, uncond, seed=2, progress=False),
                               Session(bundles["torch"]).run(cond, uncond, seed=2, progress=False), atol=1e-5, rtol=1e-5)


def test_compile_verify_refuses_a_staged_bundle(weights, tmp_path):
    """--verify compares against the captured program, which a CMD bundle is not a faster copy of."""
    with pytest.raises(LoweringError, match="staged"):
        compile_bundle(parse_recipe(cmd_recipe(weights)), TEACHER, tmp_path / "v.vdopt", verify=True)
    assert not (tmp_path / "v.vdopt").exists()


# ----- distillation --------------------------------------------------------------------------------

TINY_CMD = {"autoencoder": {"width": 16, "motion_channels": 2}, "autoencoder_batch": 2, "autoencoder_iterations": 4,
            "content_batch": 2, "content_iterations": 3, "motion": {"width": 32, "depth": 1, "heads": 2},
            "motion_batch": 2, "motion_iterations": 3, "checkpoint_every": 2}


def distill_recipe(path: Path, **cmd) -> Path:
    data = {**cmd_recipe(Path("unused"), batch=1), "passes": [],
            "distill": {"method": "cmd", "student_steps": 1, "prompts": 2, "seeds_per_prompt": 2, "shard_size": 4,
                        "cmd": {**TINY_CMD, **cmd}}}
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_tiny_cmd_distillation_end_to_end(tmp_path):
    from vdopt.distill.cli import distill

    summary = distill(distill_recipe(tmp_path / "r.yaml", motion_guidance=2.5), TEACHER, tmp_path / "out", progress=False)
    assert summary["method"] == "cmd" and Path(summary["weights"]).is_file()
    recipe = yaml.safe_load(Path(summary["recipe"]).read_text())
    assert recipe["passes"][0] == {"name": "rewrite_content_motion", "params": {"weights": str(Path(summary["weights"]).resolve())}}
    assert "distill" not in recipe
    compile_bundle(Path(summary["recipe"]), TEACHER, tmp_path / "cmd.vdopt")
    session = Session(tmp_path / "cmd.vdopt")
    clip = session.run(*session.prompt_encoder()("green triangle moving left"), seed=0, progress=False)
    torch.testing.assert_close(clip, CMDGenerator(summary["weights"], steps=STEPS)(["green triangle moving left"], 0),
                               atol=1e-5, rtol=1e-5)
    assert CMDGenerator(summary["weights"]).motion_guidance == 2.5
    written = lambda: {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "cmd").glob("*.safetensors")}  # noqa: E731
    trained = written()
    # every stage done: nothing retrains; the motion guidance, read at export only, may change
    again = distill(distill_recipe(tmp_path / "r.yaml", motion_guidance=1.5), TEACHER, tmp_path / "out", progress=False)
    assert again["weights"] == summary["weights"] and CMDGenerator(summary["weights"]).motion_guidance == 1.5
    assert len(trained) == 4 and written() == trained
    exported = {k.removeprefix("autoencoder."): v for k, v in load_file(summary["weights"]).items() if k.startswith("autoencoder.")}
    for name, tensor in load_file(str(tmp_path / "out" / "cmd" / "decoder.safetensors")).items():
        torch.testing.assert_close(exported[name], tensor, atol=0, rtol=0, msg=name)  # the fine-tuned decoder is shipped


class Estimates(torch.nn.Module):
    """A content denoiser whose clean-frame estimate is `conditional` under a prompt and `unconditional` under the
    null prompt, at every noise level (as velocity, the way the reference denoiser answers)."""

    def __init__(self, conditioner, conditional: torch.Tensor, unconditional: torch.Tensor):
        super().__init__()
        self.null, self.conditional, self.unconditional = conditioner.null(1), conditional, unconditional

    def forward(self, x, t, context):
        from vdopt.reference.model import velocity_from_sample

        is_null = torch.isclose(context, self.null.expand_as(context)).flatten(1).all(1).view(-1, 1, 1, 1, 1)
        x0 = torch.where(is_null, torch.cat([self.unconditional] * 2), torch.cat([self.conditional] * 2))
        return velocity_from_sample(x, x0, t)


def test_with_generator_errors_replaces_half_the_frames_by_the_guided_estimate():
    from vdopt.cmd.train import conditioner_of, with_generator_errors
    from vdopt.distill.common import load_teacher

    conditioner = conditioner_of(load_teacher(parse_recipe(cmd_recipe(Path("unused"), batch=1)), TEACHER))
    contents, conditional, unconditional = (torch.randn(64, 3, 1, 8, 8, generator=torch.Generator().manual_seed(k)) for k in range(3))
    attrs = torch.tensor([[0, 1, 2]] * 64)
    out = with_generator_errors(Estimates(conditioner, conditional, unconditional), conditioner, contents, attrs, 0.4, 3.0,
                                torch.Generator().manual_seed(0))
    guided = unconditional + 3.0 * (conditional - unconditional)
    kept = torch.tensor([torch.equal(o, c) for o, c in zip(out, contents)])
    assert 16 < int(kept.sum()) < 48
    torch.testing.assert_close(out[~kept], guided[~kept], atol=1e-4, rtol=1e-4)  # the estimate, whatever the noise level
    exact = Estimates(conditioner, contents, contents)  # a generator without errors leaves every frame as it was
    torch.testing.assert_close(with_generator_errors(exact, conditioner, contents, attrs, 0.4, 3.0, torch.Generator()), contents,
                               atol=1e-4, rtol=1e-4)


def test_the_decoder_stage_trains_the_decoder_alone(tmp_path):
    from safetensors.torch import save_file

    from vdopt.cmd.model import ContentMotionAutoencoder
    from vdopt.cmd.train import content_model, stage_weights, train_decoder
    from vdopt.distill.common import Dist, load_teacher
    from vdopt.distill.config import CMDSection

    teacher = load_teacher(parse_recipe(cmd_recipe(Path("unused"), batch=1)), TEACHER)
    section = CMDSection(**{**TINY_CMD, "decoder_iterations": 3})
    stage_weights(tmp_path, "autoencoder").parent.mkdir(parents=True)
    save_file(ContentMotionAutoencoder(**section.autoencoder).state_dict(), str(stage_weights(tmp_path, "autoencoder")))
    save_file(content_model(teacher)[0].state_dict(), str(stage_weights(tmp_path, "content")))
    samples = (torch.rand(4, 3, 8, 32, 32) * 2 - 1, torch.tensor([[0, 0, 0]] * 4))
    trainer = train_decoder(tmp_path, teacher, section, samples, seed=0, dist=Dist())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.run(None, progress=False)
    after = load_file(str(stage_weights(tmp_path, "decoder")))
    decoding = {f"{name}." for name, module in trainer.model.named_children() if module in trainer.model.decoding_modules()}
    assert decoding == {"content_embed.", "from_x.", "from_y.", "decoder.", "unpatch.", "out."}
    for name, tensor in before.items():
        changed = not torch.equal(after[name], tensor)
        assert changed == name.startswith(tuple(decoding)) or not tensor.is_floating_point(), name


def test_a_stage_killed_midway_resumes_to_the_uninterrupted_weights(tmp_path):
    from vdopt.distill.cli import distill

    recipe = distill_recipe(tmp_path / "r.yaml", autoencoder_iterations=400, checkpoint_every=1)
    distill(recipe, TEACHER, tmp_path / "whole", stages=("autoencoder",), progress=False)
    command = [sys.executable, "-m", "vdopt.distill.cli", str(recipe), str(TEACHER), "-o", str(tmp_path / "killed"),
               "--stage", "autoencoder", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "cmd" / "autoencoder" / "ckpt.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "cmd" / "autoencoder.safetensors").exists()
    logged = []
    distill(recipe, TEACHER, tmp_path / "killed", stages=("autoencoder",), progress=False, log=logged.append)
    assert any("resuming at iteration" in line for line in logged), logged
    whole = load_file(str(tmp_path / "whole" / "cmd" / "autoencoder.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "cmd" / "autoencoder.safetensors"))
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, atol=0, rtol=0, msg=name)


def test_under_symmetries_gives_each_clip_one_of_its_flips_transposes_and_time_reversals():
    from vdopt.cmd.train import under_symmetries

    clips = torch.randn(64, 3, 4, 6, 6)
    out = under_symmetries(clips, torch.Generator().manual_seed(0))
    def variants(c):
        flips = [c.flip(d) if d else c for d in ([], [3], [2], [1], [3, 2], [3, 1], [2, 1], [3, 2, 1])]
        return flips + [f.transpose(2, 3) for f in flips]

    assert all(any(torch.equal(o, v) for v in variants(c)) for o, c in zip(out, clips))
    unchanged = sum(torch.equal(o, c) for o, c in zip(out, clips))
    assert 0 < unchanged < 16  # about 1 in 16 draws no symmetry at all
    torch.testing.assert_close(under_symmetries(clips, torch.Generator().manual_seed(0)), out, atol=0, rtol=0)
    oblong = torch.randn(8, 3, 4, 6, 8)
    assert under_symmetries(oblong, torch.Generator().manual_seed(1)).shape == oblong.shape  # no transposition


def test_under_prompt_symmetries_moves_each_object_the_way_its_new_prompt_says():
    from vdopt.cmd.train import under_prompt_symmetries
    from vdopt.data.moving_shapes import ALL_COMBOS, HELD_OUT_COMBOS, SHAPES, make_clip
    from vdopt.eval.metrics import direction_of_motion, object_track

    seen = [a for a in ALL_COMBOS if a not in set(HELD_OUT_COMBOS)]
    clips = torch.stack([make_clip(a, seed=k).video for k, a in enumerate(seen)])
    attrs = torch.tensor(seen)
    out, out_attrs = under_prompt_symmetries(clips, attrs)
    torch.testing.assert_close(out[:len(seen)], clips, atol=0, rtol=0)
    images = out_attrs[len(seen):]
    assert not set(map(tuple, out_attrs.tolist())) & set(map(tuple, HELD_OUT_COMBOS))
    assert SHAPES.index("triangle") not in images[:, 0].tolist()
    symmetric = [a for a in seen if SHAPES[a[0]] != "triangle"]
    held_out_symmetric = sum(SHAPES[a[0]] != "triangle" for a in HELD_OUT_COMBOS)
    assert len(symmetric) * 3 - 3 * held_out_symmetric <= len(images) < len(symmetric) * 3  # some land on held-out triples
    moving = [(clip, a) for clip, a in zip(out, out_attrs.tolist()) if direction_of_motion(object_track(clip)) is not None]
    assert len(moving) > 0.9 * len(out)
    assert all(direction_of_motion(object_track(clip)) == a[2] for clip, a in moving)


@pytest.mark.parametrize("fraction, from_teacher", [(1.0, 4), (0.5, 2), (0.0, 0)])
def test_the_autoencoder_batch_mixes_teacher_samples_and_real_clips(fraction, from_teacher, tmp_path):
    from vdopt.cmd.train import train_autoencoder
    from vdopt.data.moving_shapes import make_batch
    from vdopt.distill.common import Dist, load_teacher
    from vdopt.distill.config import CMDSection

    teacher = load_teacher(parse_recipe(cmd_recipe(Path("unused"), batch=1)), TEACHER)
    section = CMDSection(**{**TINY_CMD, "autoencoder_batch": 4, "autoencoder_teacher_fraction": fraction})
    samples = torch.zeros(5, 3, 8, 32, 32)  # all-zero "teacher samples": invariant under every symmetry
    trainer = train_autoencoder(tmp_path, teacher, section, samples, seed=0, dist=Dist())
    autoencoder = trainer.model.eval()
    real = make_batch(4 - from_teacher, 0 * 7_919 + 3, split="train").video
    clips = torch.cat([samples[:from_teacher], real])
    with torch.no_grad():
        torch.testing.assert_close(trainer.loss(3, torch.Generator()), (autoencoder(clips) - clips).pow(2).mean())


def test_distill_names_the_stages_of_its_method(tmp_path):
    from vdopt.distill.cli import distill
    from vdopt.distill.common import DistillError

    with pytest.raises(DistillError, match="distill.method cmd has the stages trajectories, autoencoder"):
        distill(distill_recipe(tmp_path / "r.yaml"), TEACHER, tmp_path / "out", stages=("train",), progress=False)
    bad = yaml.safe_load((tmp_path / "r.yaml").read_text())
    bad["distill"]["cmd"]["motion"] = {"widht": 8}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception, match="widht"):
        distill(tmp_path / "bad.yaml", TEACHER, tmp_path / "out2", progress=False)
