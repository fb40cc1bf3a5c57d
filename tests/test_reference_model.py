import json

import pytest
import torch

from vdopt.data.moving_shapes import ClipConfig, make_batch
from vdopt.reference import model as RM
from vdopt.reference.model import (
    TEACHER_CONFIG, WEIGHTS_DIR, PromptConditioner, build_teacher, load_reference, save_reference,
)
from vdopt.reference.sample import initial_noise, make_scheduler, sample

TINY = dict(TEACHER_CONFIG, num_layers=1, num_attention_heads=1, attention_head_dim=16, cross_attention_dim=16,
            caption_channels=8)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    t = build_teacher(TINY).eval()
    c = PromptConditioner(dim=8).eval()
    return t, c


def test_teacher_config_is_a_pixel_space_latte():
    from diffusers import LatteTransformer3DModel

    assert TEACHER_CONFIG["in_channels"] == 5 and TEACHER_CONFIG["out_channels"] == 3  # RGB + 2 layout channels
    assert TEACHER_CONFIG["sample_size"] == 32 and TEACHER_CONFIG["patch_size"] in (2, 4)
    assert TEACHER_CONFIG["video_length"] == 8
    t = build_teacher()
    assert isinstance(t, LatteTransformer3DModel)
    assert len(t.transformer_blocks) == len(t.temporal_transformer_blocks) == TEACHER_CONFIG["num_layers"]
    assert any(k.startswith("prompt_layout.") for k in t.state_dict())
    n = sum(p.numel() for p in t.parameters())
    assert 4 * n < 20e6  # fp32 weights under 20 MB


def test_forward_shape_and_channels(tiny):
    t, c = tiny
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        out = RM.ReferenceDenoiser(t)(x, torch.tensor([10.0, 900.0]), c.encode(["red circle moving up", "blue square moving left"]))
    assert out.shape == (2, 3, 8, 32, 32)
    assert torch.isfinite(out).all()


def test_prompt_layout_is_a_coarse_per_frame_map_of_the_prompt(tiny):
    t, c = tiny
    with torch.no_grad():
        maps = t.prompt_layout(torch.cat([c.encode(["red circle moving up", "red circle moving down"]), c.null(1)]), (8, 32, 32))
    assert maps.shape == (3, 2, 8, 32, 32)
    grid = maps[:, :, :, ::4, ::4]  # an 8 x 8 lattice per frame, each cell 4 x 4 pixels
    torch.testing.assert_close(maps, grid.repeat_interleave(4, -2).repeat_interleave(4, -1), rtol=0, atol=0)
    assert not torch.allclose(maps[0], maps[1]) and not torch.allclose(maps[0], maps[2])
    assert not torch.allclose(maps[0, :, 0], maps[0, :, 7])  # one map per frame


def test_a_config_without_extra_input_channels_has_no_layout():
    from vdopt.families.reference import REFERENCE

    plain = build_teacher(dict(TINY, in_channels=3))
    assert not hasattr(plain, "prompt_layout")
    assert REFERENCE.in_channels(TEACHER_CONFIG) == 3 and hasattr(REFERENCE.build(TINY), "prompt_layout")


def test_conditioner_tokens_and_null():
    c = PromptConditioner(dim=16)
    e = c.encode(["red circle moving up", "red square moving up", "red circle moving up"])
    assert e.shape == (3, 3, 16)
    torch.testing.assert_close(e[0], e[2])
    torch.testing.assert_close(e[0, 0], e[1, 0])  # same colour token
    assert not torch.allclose(e[0, 1], e[1, 1])  # different shape token
    n = c.null(4)
    assert n.shape == (4, 3, 16)
    assert not torch.allclose(n[0], e[0])
    b = make_batch(4, seed=0)
    torch.testing.assert_close(c.encode(b.prompts), c.encode_attrs(b.attrs))
    with pytest.raises(ValueError):
        c.encode(["purple circle moving up"])


def test_save_load_round_trip(tiny, tmp_path):
    t, c = tiny
    save_reference(t, c, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["transformer"]["num_layers"] == 1 and cfg["conditioner"]["dim"] == 8
    t2, c2 = load_reference(tmp_path)
    for (k, v), (k2, v2) in zip(t.state_dict().items(), t2.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, v2, rtol=0, atol=0)
    torch.testing.assert_close(c.encode(["red circle moving up"]), c2.encode(["red circle moving up"]), rtol=0, atol=0)
    assert not any(p.requires_grad for p in t2.parameters())
    with pytest.raises(FileNotFoundError, match="vdopt.reference.train"):
        load_reference(tmp_path / "missing")


def test_sample_matches_a_hand_written_euler_cfg_loop(tiny):
    t, c = tiny
    prompts = ["red circle moving up", "green triangle moving down-left"]
    g, steps = 2.5, 3
    out = sample(t, c, prompts, seed=5, steps=steps, guidance_scale=g)
    assert out.shape == (2, 3, 8, 32, 32)
    # by hand: diffusers' sigmas (shift 1: linspace(1, 1/1000, steps) then 0), x <- x + (s_next - s) * v,
    # the transformer predicts x0, v = (x - x0) / max(sigma, SIGMA_MIN), v = u + g (c - u),
    # model timestep = sigma * 1000
    x = initial_noise(2, 5)
    sched = make_scheduler(steps)
    sig = sched.sigmas
    torch.testing.assert_close(sig, torch.tensor([1.0, 0.5005, 0.001, 0.0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sched.timesteps, sig[:-1] * 1000)
    with torch.no_grad():
        for i in range(steps):
            ts = torch.full((2,), float(sig[i]) * 1000)
            divisor = max(float(sig[i]), RM.SIGMA_MIN)
            x0_u, x0_c = (
                t(hidden_states=torch.cat([x, t.prompt_layout(ctx, (8, 32, 32))], 1), timestep=ts, encoder_hidden_states=ctx,
                  return_dict=False)[0]
                for ctx in (c.null(2), c.encode(prompts))
            )
            u, cc = (x - x0_u) / divisor, (x - x0_c) / divisor
            x = x + (sig[i + 1] - sig[i]) * (u + g * (cc - u))
    torch.testing.assert_close(out, x.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    # deterministic in the seed, different for another seed
    torch.testing.assert_close(sample(t, c, prompts, seed=5, steps=steps, guidance_scale=g), out, rtol=0, atol=0)
    assert not torch.allclose(sample(t, c, prompts, seed=6, steps=steps, guidance_scale=g), out)


def test_flow_matching_loss_target_convention():
    from vdopt.reference.train import flow_matching_loss

    class Oracle(torch.nn.Module):
        """Predicts the clean clip it was told about (the teacher is an x0-predictor)."""

        def __init__(self, x0, noise):
            super().__init__()
            self.x0, self.noise, self.answer = x0, noise, x0
            self.noise_levels = []

        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            s = (timestep / 1000.0).view(-1, 1, 1, 1, 1)
            # check the interpolation convention too: x_s = (1 - s) x0 + s noise
            torch.testing.assert_close(hidden_states, (1 - s) * self.x0 + s * self.noise)
            self.noise_levels.append(s.flatten())
            return (self.answer,)

    b = make_batch(512, seed=1, config=ClipConfig(frames=2, height=16, width=16))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(b.video.shape, generator=torch.Generator().manual_seed(0))
    oracle = Oracle(b.video, noise)
    loss = flow_matching_loss(RM.ReferenceDenoiser(oracle), PromptConditioner(dim=8), b.video, b.attrs, g)
    assert float(loss) == pytest.approx(0.0, abs=1e-10)
    assert float(oracle.noise_levels[0].min()) < RM.SIGMA_MIN  # exact also where the velocity is clamped
    # a wrong clean clip costs |x0_hat - x0|^2 / max(s, SIGMA_MIN)^2: 1 / s^2 for an error of 1 everywhere
    oracle.answer = b.video + 1
    oracle.noise_levels.clear()
    loss = flow_matching_loss(RM.ReferenceDenoiser(oracle), PromptConditioner(dim=8), b.video, b.attrs,
                              torch.Generator().manual_seed(0))
    s = oracle.noise_levels[0]
    assert float(loss) == pytest.approx(float((1 / s.clamp_min(RM.SIGMA_MIN) ** 2).mean()), rel=1e-5)


def test_velocity_from_sample_is_the_flow_velocity_clamped_at_sigma_min():
    x0, noise = torch.randn(3, 3, 2, 8, 8), torch.randn(3, 3, 2, 8, 8)
    s = torch.tensor([1.0, 0.5, 0.01])
    x_s = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
    v = RM.velocity_from_sample(x_s, x0, s * 1000)
    torch.testing.assert_close(v[:2], (noise - x0)[:2])
    torch.testing.assert_close(v[2], (x_s[2] - x0[2]) / RM.SIGMA_MIN)
    torch.testing.assert_close(RM.sample_from_velocity(x_s, v, s * 1000), x0)  # the inverse, below SIGMA_MIN too


@pytest.mark.skipif(not (WEIGHTS_DIR / RM.WEIGHTS_FILE).exists(), reason="teacher weights not shipped yet")
def test_shipped_teacher_loads_and_is_small():
    t, c = load_reference()
    assert (WEIGHTS_DIR / RM.WEIGHTS_FILE).stat().st_size <= 20 * 2**20
    assert t.config.out_channels == 3 and t.config.video_length == 8
    with torch.no_grad():
        out = sample(t, c, ["blue square moving right"], seed=0, steps=2)
    assert out.shape == (1, 3, 8, 32, 32)


@pytest.mark.skipif(not (WEIGHTS_DIR / RM.WEIGHTS_FILE).exists(), reason="teacher weights not shipped yet")
def test_shipped_teacher_moves_its_clean_estimate_along_the_prompt_direction():
    """At pure noise the teacher's clean-clip estimate is the mean clip of the prompt: its mass must
    travel the prompt's way (the first teacher's was the same clip for every direction)."""
    from vdopt.data.moving_shapes import BACKGROUND_LEVEL, DIRECTION_VEC, DIRECTIONS, prompt_of

    t, c = load_reference()
    cosines = []
    for d, name in enumerate(DIRECTIONS):
        prompts = [prompt_of((k % 3, k % 4, d)) for k in range(4)]
        x = initial_noise(4, 100 + d)
        with torch.no_grad():
            x0 = x - RM.ReferenceDenoiser(t)(x, torch.full((4,), 1000.0), c.encode(prompts))
        mass = (x0 - BACKGROUND_LEVEL).abs().mean(1)  # [B, F, H, W]
        mass = (mass - mass.mean((2, 3), keepdim=True)).clamp(min=0)
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        total = mass.sum((2, 3))
        centre = torch.stack([(mass * xx).sum((2, 3)) / total, (mass * yy).sum((2, 3)) / total], -1)  # [B, F, 2]
        frames = torch.arange(8.0) - 3.5
        velocity = (centre * frames[:, None]).sum(1) / frames.pow(2).sum()
        want = torch.tensor(DIRECTION_VEC[name], dtype=torch.float32)
        cosines.append(torch.nn.functional.cosine_similarity(velocity, want.expand_as(velocity), dim=1))
    assert float(torch.cat(cosines).mean()) > 0.8


def test_compiled_teacher_bundle_generates_what_the_reference_loop_does(tiny, tmp_path):
    """`vdopt eval` compares bundles with the teacher run by `sample`: the two must be the same generator."""
    from vdopt.compiler import compile_bundle
    from vdopt.eval.cli import generate_from_bundle
    from vdopt.eval.suite import teacher_generate_fn
    from vdopt.recipe import parse_recipe

    t, c = tiny
    save_reference(t, c, tmp_path / "teacher")
    recipe = parse_recipe({
        "model": {"family": "reference", "config": dict(TINY),
                  "input": {"batch": 1, "frames": 8, "height": 32, "width": 32, "text_len": 3}},
        "sampler": {"kind": "flow_euler", "steps": 4, "shift": 1.0, "guidance_scale": 3.0},
        "lower": {"backend": "torch"},
    })
    bundle = tmp_path / "teacher.vdopt"
    compile_bundle(recipe, tmp_path / "teacher" / RM.WEIGHTS_FILE, bundle)
    prompts, seeds = ["red circle moving up", "blue triangle moving down-left"], [3, 11]
    compiled = generate_from_bundle(bundle)(prompts, seeds)
    eager = teacher_generate_fn(t, c, steps=4, guidance_scale=3.0)(prompts, seeds)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
