"""vdopt distill on a tiny random reference-style teacher: stages, resume, export, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vdopt.distill.cli import distill, main as distill_main
from vdopt.distill.config import load_distill_recipe
from vdopt.errors import RecipeError

TINY_LATTE = dict(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3, num_layers=2, cross_attention_dim=16,
                  caption_channels=16, attention_bias=True, sample_size=8, patch_size=4, activation_fn="gelu-approximate",
                  num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, video_length=2)
DISTILL = {"student_steps": 2, "prompts": 2, "seeds_per_prompt": 2, "shard_size": 3, "iterations": 4, "batch_size": 4,
           "checkpoint_every": 2, "adv_start": 1, "disc_blocks": 2, "head_dim": 8, "lr": 1e-3, "disc_lr": 1e-3, "ema_decay": 0.5}


def write_recipe(path: Path, **changes) -> Path:
    recipe = {"model": {"family": "reference", "config": TINY_LATTE, "input": {"frames": 2, "height": 8, "width": 8, "text_len": 3}},
              "sampler": {"steps": 4, "guidance_scale": 3.0}, "lower": {"backend": "torch"}, "distill": {**DISTILL, **changes}}
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from diffusers import LatteTransformer3DModel

    from vdopt.reference.model import PromptConditioner

    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    model, conditioner = LatteTransformer3DModel(**TINY_LATTE), PromptConditioner(dim=16)
    save_file({**{f"transformer.{k}": v.contiguous() for k, v in model.state_dict().items()},
               **{f"conditioner.{k}": v.contiguous() for k, v in conditioner.state_dict().items()}}, str(root / "teacher.safetensors"))
    write_recipe(root / "recipe.yaml")
    return root


@pytest.fixture(scope="module")
def full_run(workdir):
    """One uninterrupted run of all three stages."""
    out = workdir / "full"
    summary = distill(workdir / "recipe.yaml", workdir / "teacher.safetensors", out, progress=False, threads=1)
    return out, summary


def test_trajectories_are_key_points_of_the_guided_teacher(workdir, full_run):
    from vdopt.distill.common import PromptEncoder, load_teacher, prompt_list, schedule_for

    out, summary = full_run
    assert summary["schedule"]["key_indices"] == [0, 2, 4]
    shards = sorted((out / "trajectories").glob("shard_*.safetensors"))
    assert [p.name for p in shards] == ["shard_00000.safetensors", "shard_00001.safetensors"]  # 4 samples, 3 per shard
    data = load_file(str(shards[0]))
    assert data["latents"].shape == (3, 3, 3, 2, 8, 8) and data["sample_ids"].tolist() == [0, 1, 2]
    with safe_open(str(shards[0]), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["key_indices"]) == [0, 2, 4] and len(json.loads(meta["prompts"])) == 3
    # sample 2 re-solved alone: the same noise and the same guided key points (plain Euler + CFG)
    recipe, section, _ = load_distill_recipe(workdir / "recipe.yaml")
    teacher = load_teacher(recipe, workdir / "teacher.safetensors")
    schedule = schedule_for(recipe, section)
    cond, uncond = PromptEncoder(teacher, section, prompt_list(section))([1])
    x = torch.randn((1, 3, 2, 8, 8), generator=torch.Generator().manual_seed(section.seed * 1_000_003 + 2))
    torch.testing.assert_close(data["latents"][2, 0], x[0])
    expected = {0: x}
    with torch.no_grad():
        for i, t in enumerate(schedule.teacher_timesteps):
            c = teacher.denoiser(x, torch.tensor([t]), cond["encoder_hidden_states"])
            u = teacher.denoiser(x, torch.tensor([t]), uncond["encoder_hidden_states"])
            x = x + (schedule.teacher_sigmas[i + 1] - schedule.teacher_sigmas[i]) * (u + 3.0 * (c - u))
            expected[i + 1] = x
    torch.testing.assert_close(data["latents"][2], torch.cat([expected[k] for k in (0, 2, 4)]), atol=1e-5, rtol=1e-5)


def test_training_logs_both_losses_and_exports_a_student(workdir, full_run):
    out, summary = full_run
    assert summary["iterations"] == 4 and set(summary["last"]) == {"iteration", "traj", "g_adv", "d"}
    with safe_open(str(out / "student.safetensors"), framework="pt") as f:
        schedule = json.loads(f.metadata()["vdopt_schedule"])
        keys = list(f.keys())
    assert schedule["steps"] == 2 and schedule["teacher_steps"] == 4 and schedule["key_indices"] == [0, 2, 4]
    assert any(k.startswith("conditioner.") for k in keys) and any(k.startswith("transformer.") for k in keys)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["passes"][0]["name"] == "reduce_steps" and recipe["passes"][0]["params"]["timesteps"] == schedule["timesteps"]
    assert "distill" not in recipe
    # the student moved away from the teacher
    teacher = load_file(str(workdir / "teacher.safetensors"))
    student = load_file(str(out / "student.safetensors"))
    assert max((student[k] - teacher[k]).abs().max().item() for k in teacher if k.startswith("transformer.")) > 0


def assert_program_is_the_students_loop(program, student) -> None:
    """The compiled few-step program's loop equals the student's plain Euler loop over its timesteps."""
    x = torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(2))
    expected, sigmas = x, [t / 1000 for t in program.step_table["timesteps"]] + [0.0]
    module = program.ep.module()
    with torch.no_grad():
        for i, t in enumerate(program.step_table["timesteps"]):
            expected = expected + (sigmas[i + 1] - sigmas[i]) * student.denoiser(expected, torch.tensor([t]), cond)
            x = module(x, torch.tensor(i), cond)[0]
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


def test_the_exported_recipe_compiles_through_reduce_steps(workdir, full_run):
    from vdopt.compiler import compile_program
    from vdopt.recipe import load_recipe

    out, _ = full_run
    program = compile_program(load_recipe(out / "recipe.yaml"), workdir / "teacher.safetensors")
    assert program.num_steps == 2 and not program.guidance
    # the program's loop equals the student's plain loop with the exported weights
    from vdopt.distill.common import load_teacher

    recipe, _, _ = load_distill_recipe(workdir / "recipe.yaml")
    student = load_teacher(recipe, out / "student.safetensors")
    assert_program_is_the_students_loop(program, student)


PRUNED_TEMPORAL_1 = {"blocks": [1]}
PRUNED_BOTH_KINDS = [{"blocks": [1], "what": "temporal"}, {"blocks": ["transformer_blocks.1"], "what": "blocks"}]


@pytest.mark.parametrize("prune, paths", [(PRUNED_TEMPORAL_1, ["temporal_transformer_blocks.1"]),
                                          (PRUNED_BOTH_KINDS, ["temporal_transformer_blocks.1", "transformer_blocks.1"])],
                         ids=["temporal", "both-kinds"])
def test_a_pruned_recovery_trains_without_the_blocks_and_exports_a_recipe_that_prunes_them(workdir, full_run, tmp_path,
                                                                                             prune, paths):
    """distill.prune (one spec, or one per kind): the student is trained with the blocks bypassed, starting from
    `init_weights`; the export is a whole model (the bypassed blocks keep their starting weights) and a recipe that
    prunes them after reduce_steps; the compiled program equals the eager student with those blocks bypassed."""
    from safetensors.torch import load_file

    from vdopt.compiler import compile_program
    from vdopt.distill.common import load_teacher
    from vdopt.families.base import Bypassed
    from vdopt.recipe import load_recipe

    out, _ = full_run
    recipe = write_recipe(tmp_path / "pruned.yaml", prune=prune, init_weights=str(out / "student.safetensors"), adv_weight=0.0)
    pruned = tmp_path / "pruned"
    shutil.copytree(out / "trajectories", pruned / "trajectories")  # the same teacher solves serve every student
    summary = distill(recipe, workdir / "teacher.safetensors", pruned, progress=False, threads=1)
    assert summary["iterations"] == 4 and set(summary["last"]) == {"iteration", "traj"}
    start, exported = load_file(out / "student.safetensors"), load_file(pruned / "student.safetensors")
    assert exported.keys() == start.keys()
    bypassed = [k for k in start if any(f".{path}." in k for path in paths)]
    assert bypassed and all(torch.equal(exported[k], start[k]) for k in bypassed)
    assert any(not torch.equal(exported[k], start[k]) for k in start if ".temporal_transformer_blocks.0." in k)
    compile_recipe = load_recipe(pruned / "recipe.yaml")
    specs = prune if isinstance(prune, list) else [prune]
    assert [(p.name, p.params.get("blocks")) for p in compile_recipe.passes] == [
        ("reduce_steps", None), *(("prune_temporal", spec["blocks"]) for spec in specs)]
    program = compile_program(compile_recipe, workdir / "teacher.safetensors")
    assert not any(k.startswith(tuple(f"denoiser.model.{path}." for path in paths)) for k in program.ep.state_dict)
    student = load_teacher(load_distill_recipe(recipe)[0], pruned / "student.safetensors")
    for path in paths:
        parent, _, index = path.rpartition(".")
        getattr(student.model, parent)[int(index)] = Bypassed()
    assert_program_is_the_students_loop(program, student)


def test_two_prune_specs_of_one_kind_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="one spec per kind"):
        load_distill_recipe(write_recipe(tmp_path / "twice.yaml", prune=[{"blocks": [0]}, {"blocks": [1]}]))


def test_a_checkpoint_of_another_network_is_refused_by_name(workdir, full_run, tmp_path):
    """Checkpoints copied from an unpruned run into a pruned run's directory: a clear error, not a state-dict traceback."""
    from vdopt.distill.common import DistillError

    out, _ = full_run
    recipe = write_recipe(tmp_path / "pruned.yaml", prune={"blocks": [1]}, adv_weight=0.0)
    moved = tmp_path / "moved"
    shutil.copytree(out / "trajectories", moved / "trajectories")
    shutil.copytree(out / "checkpoints", moved / "checkpoints")
    with pytest.raises(DistillError, match=r"ckpt_0000004.pt is a checkpoint of another network .*temporal_transformer_blocks.1"):
        distill(recipe, workdir / "teacher.safetensors", moved, progress=False, threads=1)


@pytest.mark.parametrize("blocks", [[5], ["transformer_blocks.0"]])
def test_a_prune_spec_naming_no_temporal_block_is_refused(workdir, tmp_path, blocks):
    from vdopt.distill.common import DistillError, build_student, load_teacher

    recipe, section, _ = load_distill_recipe(write_recipe(tmp_path / "bad.yaml", prune={"blocks": blocks}))
    with pytest.raises(DistillError, match=r"distill.prune: (block index 5 is out of range|'transformer_blocks.0' names no "
                                           r"temporal block).*temporal_transformer_blocks.0, temporal_transformer_blocks.1"):
        build_student(load_teacher(recipe, workdir / "teacher.safetensors"), section)


def test_ema_warm_up_forgets_the_teacher_it_starts_from():
    from vdopt.distill.train import ema_decay_at

    decays = [ema_decay_at(n, 0.999) for n in range(2000)]
    assert decays[0] == pytest.approx(0.1) and decays == sorted(decays) and max(decays) <= 0.999
    assert ema_decay_at(20_000, 0.999) == 0.999
    teacher_share = torch.tensor(decays, dtype=torch.float64).prod().item()  # weight of the initial value after 2000 updates
    assert teacher_share < 1e-20 < 0.999 ** 2000


def test_kill_and_resume_gives_the_uninterrupted_weights(workdir, full_run):
    out, _ = full_run
    resumed = workdir / "resumed"
    shutil.copytree(out / "trajectories", resumed / "trajectories")  # stage 1 already done: its shards are reused
    first = distill(workdir / "recipe.yaml", workdir / "teacher.safetensors", resumed, progress=False, threads=1, max_iterations=3)
    assert first["iterations"] == 3 and "weights" not in first  # "killed" after 3 iterations, checkpoint at 3
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["ckpt_0000002.pt", "ckpt_0000003.pt"]
    second = distill(workdir / "recipe.yaml", workdir / "teacher.safetensors", resumed, progress=False, threads=1)
    assert second["iterations"] == 4
    a, b = load_file(str(out / "student.safetensors")), load_file(str(resumed / "student.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit


def test_resume_refuses_different_settings(workdir, full_run, tmp_path):
    out, _ = full_run
    changed = write_recipe(tmp_path / "changed.yaml", lr=5e-4)
    with pytest.raises(Exception, match="different settings"):
        distill(changed, workdir / "teacher.safetensors", out, progress=False)


def test_resume_reads_settings_added_since_as_their_defaults(workdir, full_run, tmp_path):
    out, _ = full_run
    older = tmp_path / "older"
    shutil.copytree(out, older)
    settings = json.loads((older / "distill.json").read_text())
    del settings["distill"]["cmd"]["content_corruption"]  # a distill.json written before the option existed
    (older / "distill.json").write_text(json.dumps(settings))
    assert "weights" in distill(workdir / "recipe.yaml", workdir / "teacher.safetensors", older, progress=False)
    settings["distill"]["cmd"]["content_corruption"] = 0.1  # not the default: a different setting
    (older / "distill.json").write_text(json.dumps(settings))
    with pytest.raises(Exception, match="different settings"):
        distill(workdir / "recipe.yaml", workdir / "teacher.safetensors", older, progress=False)


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b"\xff\xfe\x00"])
def test_resume_refuses_a_settings_file_that_is_not_settings(workdir, tmp_path, content):
    from vdopt.distill.common import DistillError

    out = tmp_path / "out"
    out.mkdir()
    (out / "distill.json").write_bytes(content)
    with pytest.raises(DistillError, match="distill.json: .*use a new output directory or delete it"):
        distill(workdir / "recipe.yaml", workdir / "teacher.safetensors", out, progress=False)


def test_recipe_errors_name_the_key(tmp_path):
    bad = write_recipe(tmp_path / "bad.yaml", student_steps=9)
    with pytest.raises(RecipeError, match="student_steps"):
        load_distill_recipe(bad)
    typo = write_recipe(tmp_path / "typo.yaml", iteratons=3)
    with pytest.raises(RecipeError, match="distill.iteratons"):
        load_distill_recipe(typo)
    assert distill_main([str(typo), "t.safetensors", "-o", str(tmp_path / "o"), "--quiet"]) == 2


def test_distill_reference_recipe_is_valid():
    recipe, section, _ = load_distill_recipe(Path(__file__).parents[1] / "recipes" / "distill_reference.yaml")
    assert recipe.model.family == "reference" and recipe.sampler.steps == 50 and section.student_steps == 4
    from vdopt.distill.common import schedule_for

    assert schedule_for(recipe, section).key_indices == [0, 12, 25, 37, 50]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(workdir, full_run, tmp_path):
    """Same global batches on 2 gloo ranks: the same student up to float summation order.

    The two ranks each average the loss over half of every global batch and the gradients are
    averaged with an all-reduce; one process averages over the whole batch. The sums run in a
    different order (and batched GEMMs block differently at batch 2 vs 4), so the weights agree to
    float32 rounding, not bit for bit; attention key biases, whose true gradient is zero, only
    move by rounding noise in either run.
    """
    out, _ = full_run
    two = tmp_path / "two"
    shutil.copytree(out / "trajectories", two / "trajectories")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "vdopt.distill.cli", str(workdir / "recipe.yaml"), str(workdir / "teacher.safetensors"), "-o", str(two), "--quiet"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(str(out / "student.safetensors")), load_file(str(two / "student.safetensors"))
    teacher = load_file(str(workdir / "teacher.safetensors"))
    for key in a:
        if key.endswith("to_k.bias"):
            # A key bias adds the same logit to every key of a query; softmax ignores that, so its gradient
            # is zero in exact arithmetic and Adam turns the rounding noise (whose sign depends on the
            # summation order) into steps. Both runs must leave it where the teacher had it.
            for student in (a, b):
                torch.testing.assert_close(student[key], teacher[key], atol=1e-4, rtol=0, msg=key)
        else:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)


SHIPPED = Path(__file__).parents[1] / "vdopt" / "reference" / "weights"


@pytest.mark.skipif(not (SHIPPED / "student.safetensors").exists(), reason="no distilled student shipped")
def test_shipped_student_recipe_runs_its_weights_for_four_unguided_steps(tmp_path, monkeypatch):
    """recipes/student_reference.yaml compiles the shipped student over the shipped teacher; the bundle
    must be the plain Euler loop of the student's weights at its own sigmas, cond branch only."""
    from vdopt.compiler import compile_bundle
    from vdopt.recipe import load_recipe
    from vdopt.reference.model import ReferenceDenoiser, load_reference
    from vdopt.runtime import Session

    monkeypatch.chdir(Path(__file__).parents[1])  # the recipe's weights path is relative to the repository root
    recipe = load_recipe("recipes/student_reference.yaml")
    recipe = recipe.model_copy(update={"lower": recipe.lower.model_copy(update={"backend": "torch"})})
    assert recipe.sampler.steps == 4 and recipe.sampler.guidance_scale == 1.0
    compile_bundle(recipe, SHIPPED / "teacher.safetensors", tmp_path / "student.vdopt")
    session = Session(tmp_path / "student.vdopt")
    cond, _ = session.prompt_encoder()("green triangle moving up-right")
    got = session.run(cond, None, seed=3, progress=False)

    with safe_open(str(SHIPPED / "student.safetensors"), "pt") as f:
        schedule = json.loads(f.metadata()["vdopt_schedule"])
    model, conditioner = load_reference(SHIPPED, weights_file="student.safetensors")
    sigmas = [*schedule["sigmas"][:4], 0.0]
    x = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = conditioner.encode(["green triangle moving up-right"])
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * ReferenceDenoiser(model)(x, torch.tensor([s * 1000.0]), tokens)
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)
