"""Several static `lower.profiles` in one bundle: each segment runs with its own input and state shapes."""

from __future__ import annotations

import shutil

import pytest
import torch

from vdopt.compiler import compile_bundle
from vdopt.errors import BundleError
from vdopt.recipe import parse_recipe
from vdopt.runtime.session import Session

from test_security import reseal

PROFILES = [{"frames": 2, "height": 4, "width": 4}, {"frames": 4, "height": 4, "width": 6}]
CACHE = [{"name": "insert_cache", "params": {"policy": "first_blocks", "threshold": 0.5}}]


def recipe(profiles):
    return parse_recipe({"model": {"family": "wan", "input": {"frames": 2, "height": 4, "width": 4, "text_len": 4}},
                         "sampler": {"steps": 6}, "passes": CACHE, "lower": {"backend": "torch", "profiles": profiles}})


def cond():
    return {"encoder_hidden_states": torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))}


@pytest.fixture(scope="module")
def two_profiles(tmp_path_factory, wan_checkpoint):
    out = tmp_path_factory.mktemp("profiles") / "bundle"
    compile_bundle(recipe(PROFILES), wan_checkpoint, out)
    return out


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: f"{p['frames']}x{p['height']}x{p['width']}")
def test_each_profile_of_a_cached_bundle_runs_as_its_own_bundle(two_profiles, wan_checkpoint, tmp_path, profile):
    """Regression: the manifest held the first profile's state shapes only, so the second profile's run failed
    with `Guard failed: state_cache_0.size()[1] == 8`."""
    alone = tmp_path / "alone"
    compile_bundle(recipe([profile]), wan_checkpoint, alone)
    sizes = {k: profile[k] for k in ("frames", "height", "width")}
    seen = []
    both = Session(two_profiles).run(cond(), seed=3, progress=False, **sizes,
                                     on_step=lambda i, state: seen.append(state[3].clone()))
    expected = Session(alone).run(cond(), seed=3, progress=False, **sizes)
    torch.testing.assert_close(both, expected, rtol=0, atol=0)
    assert 0 < int(seen[-1].min()) < 6, "the cache computed some steps and reused others"


def test_a_segment_state_naming_other_tensors_is_refused(two_profiles, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(two_profiles, edited)
    reseal(edited, lambda m: m["segments"][1]["state"].pop())
    with pytest.raises(BundleError, match=r"segments\[1\]\.state names other tensors"):
        Session(edited)
