"""bench/latte_hooks.py: the adapter that lets diffusers' chain cache hooks run on Latte changes nothing
by itself, the hooks then skip work, and the counters see it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from latte_hooks import HOOKS, BlockCounter, calibrate_mag_ratios, latte_of, pair_blocks  # noqa: E402

from vdopt.reference.model import ReferenceDenoiser, build_teacher  # noqa: E402

pytest.importorskip("diffusers")


def teacher(seed: int = 0) -> ReferenceDenoiser:
    torch.manual_seed(seed)
    return ReferenceDenoiser(build_teacher()).eval()


def inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 8, 32, 32, generator=g)
    t = torch.tensor([700.0, 300.0][:batch])
    context = torch.randn(batch, 3, 64, generator=g)
    return x, t, context


def loop(denoiser, steps: int = 6):
    """A short Euler loop with diffusers' cache context set per step; returns the clip."""
    model = latte_of(denoiser)
    x, _, context = inputs(1)
    with torch.no_grad():
        for i, t in enumerate(torch.linspace(1000, 100, steps)):
            with model.cache_context("cond", step_index=i, num_inference_steps=steps, timestep=t):
                x = x - 0.1 * denoiser(x, t.expand(1), context)
    return x


def test_paired_blocks_bit_identical_to_stock():
    stock, paired = teacher(), teacher()
    pair_blocks(latte_of(paired))
    x, t, context = inputs()
    with torch.no_grad():
        torch.testing.assert_close(paired(x, t, context), stock(x, t, context), rtol=0, atol=0)
    assert [n for n, _ in latte_of(paired).named_children() if "transformer_blocks" in n] == ["transformer_blocks"]


def test_first_block_cache_fails_on_stock_latte():
    """Why the adapter exists: FirstBlockCache chains the spatial and temporal lists (different layouts)."""
    from diffusers.hooks import FirstBlockCacheConfig

    denoiser = teacher()
    latte_of(denoiser).enable_cache(FirstBlockCacheConfig(threshold=0.5))
    with pytest.raises(RuntimeError, match="size of tensor"):
        loop(denoiser)


def test_first_block_cache_on_pairs_skips_blocks_and_counter_sees_it():
    from diffusers.hooks import FirstBlockCacheConfig

    plain = teacher()
    plain_counter = BlockCounter(latte_of(plain))
    reference = loop(plain)
    assert plain_counter.block_calls == 6 * 8 and plain_counter.attention_calls == 6 * 12

    for threshold, expect_skips in ((0.0, False), (10.0, True)):
        denoiser = teacher()
        model = pair_blocks(latte_of(denoiser))
        counter = BlockCounter(model)
        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        out = loop(denoiser)
        if expect_skips:  # the first pair always runs; the rest only on the first step
            assert counter.block_calls == 6 * 2 + 6
            assert not torch.equal(out, reference)
        else:
            assert counter.block_calls == 6 * 8
            torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_magcache_calibration_ratios_parsed():
    from diffusers.hooks import MagCacheConfig

    denoiser = teacher()
    model = pair_blocks(latte_of(denoiser))
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=6))
    ratios = calibrate_mag_ratios(lambda: loop(denoiser))
    assert len(ratios) == 6 and all(r > 0 for r in ratios)


def test_hook_sweeps_go_from_least_to_most_skipping():
    for hook in HOOKS:
        assert list(hook.values) == sorted(hook.values), hook.name
