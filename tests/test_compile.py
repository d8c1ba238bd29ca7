"""--compile end to end on the CPU: same picture as the eager run, and a compile cache that a new process
(simulated by resetting dynamo's in-memory state) finds on disk in sdgen's cache folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import pixels
from PIL import Image

ARGS = ("a lighthouse at dusk", "-H", "64", "-W", "64", "--steps", "3", "--seed", "11", "--skip_grid")


@pytest.fixture
def fresh_compile_state(monkeypatch):
    """Leave no compile cache setting behind for other tests (sdgen sets the process-wide env var) and start
    from an empty dynamo cache."""
    import torch

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "placeholder")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")  # restored to 'unset' after the test
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_run_matches_eager_and_caches_on_disk(sdgen, tiny, tmp_path, fresh_compile_state):
    import torch
    from torch._dynamo.utils import counters

    eager = sdgen("txt2img", *ARGS, "--ckpt", tiny["sd1.safetensors"], "--outdir", tmp_path / "eager")
    assert eager.code == 0, eager
    compiled = sdgen("txt2img", *ARGS, "--ckpt", tiny["sd1.safetensors"], "--outdir", tmp_path / "c1", "--compile")
    assert compiled.code == 0, compiled
    assert "--compile (default)" in compiled.stderr

    a, b = pixels(eager.paths[0]).astype(int), pixels(compiled.paths[0]).astype(int)
    assert np.abs(a - b).max() <= 2  # fp32: inductor only reorders floating-point sums
    data = json.loads(Image.open(compiled.paths[0]).info["sdgen"])
    assert data["compiled"] == "default"

    cache = tmp_path / "cache" / "sdgen" / "torch-compile"  # XDG_CACHE_HOME is tmp_path/cache in tests
    assert cache.is_dir() and any(cache.rglob("*")), "nothing written to sdgen's compile cache"

    # A new process has an empty dynamo cache but the same folder on disk: the compiled graphs come from it.
    torch._dynamo.reset()
    counters.clear()
    again = sdgen("txt2img", *ARGS, "--ckpt", tiny["sd1.safetensors"], "--outdir", tmp_path / "c2", "--compile")
    assert again.code == 0, again
    assert counters["inductor"]["fxgraph_cache_hit"] >= 2  # the UNet's graph and the VAE decoder's
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    assert np.array_equal(pixels(again.paths[0]), pixels(compiled.paths[0]))


def test_compile_with_low_vram_is_a_usage_error(sdgen, tiny):
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], "--compile", "--low-vram")
    assert run.code == 2
    assert "--compile and --low-vram" in run.stderr


def test_upscale_has_no_compile_option(sdgen, tmp_path):
    run = sdgen("upscale", tmp_path / "in.png", "--ckpt", tmp_path / "x4.safetensors", "--compile")
    assert run.code == 2
    assert "No such option" in run.stderr
