"""sdgen.nets.vae against what sdgen ran before it: diffusers' AutoencoderKL as build_vae makes it."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

from sdgen.checkpoints.build import build_vae
from sdgen.checkpoints.ldm_config import Architecture, resolve, shipped_config
from sdgen.families import family_named
from sdgen.nets import vae as vae_module
from sdgen.nets.vae import AutoencoderKL, _tiled
from sdgen.testing import ldm_layout

PREFIX = "first_stage_model."
# the tiny VAEs have 32 channels at every level; "wide" doubles them at the lower levels, so that the
# nin_shortcut convolutions (and channel changes across levels) are exercised too
CASES = {"sd1": ("sd1", None), "x4": ("x4", None), "sd1-wide": ("sd1", [1, 2, 2, 2])}


def _case(name: str, folder) -> tuple[Architecture, dict[str, torch.Tensor]]:
    family, ch_mult = CASES[name]
    sd = ldm_layout.random_state_dict(family, contrast=1.0)
    ckpt, cfg = ldm_layout.write_tiny(family, folder)
    arch = resolve(sd, ckpt, cfg, None)
    if ch_mult is not None:
        params = dict(arch.params)
        first = params["first_stage_config"]
        dd = dict(first["params"]["ddconfig"], ch_mult=ch_mult)
        params["first_stage_config"] = dict(first, params=dict(first["params"], ddconfig=dd))
        arch = dataclasses.replace(arch, config={"model": {"params": params}})
        g = torch.Generator().manual_seed(2)
        sd = {k: v for k, v in sd.items() if not k.startswith(PREFIX)}
        for name_, shape in ldm_layout.vae_layout(dd).items():
            if len(shape) == 1:  # norms ~1, biases ~0, as ldm_layout does
                base = 1.0 if name_.endswith("weight") and "norm" in name_ else 0.0
                sd[PREFIX + name_] = base + 0.02 * torch.randn(shape, generator=g)
            else:
                sd[PREFIX + name_] = torch.randn(shape, generator=g) / (shape[1] * shape[2] * shape[3]) ** 0.5
    return arch, sd


def _ours(arch: Architecture, sd: dict[str, torch.Tensor]) -> AutoencoderKL:
    first = arch.params["first_stage_config"]["params"]
    with torch.device("meta"):
        vae = AutoencoderKL(first["ddconfig"], first["embed_dim"], arch.params["scale_factor"])
    weights = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    vae.load_state_dict(weights, strict=True, assign=True)
    # frozen as sdgen's loader makes them: a weight that requires grad takes another (CPU bf16) linear kernel
    return vae.requires_grad_(False).eval()


def _inputs(vae: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    f = vae.factor
    z = torch.randn(2, vae.config.latent_channels, 12, 8, generator=g)
    x = torch.rand(2, 3, 8 * f, 6 * f, generator=g) * 2 - 1
    return z, x


def _diff(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    assert got.shape == expected.shape
    return (got - expected).abs().max().item(), expected.abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers_autoencoder_kl(name, tmp_path):
    arch, sd = _case(name, tmp_path)
    reference, ours = build_vae(arch, sd, "test"), _ours(arch, sd)
    z, x = _inputs(ours)
    with torch.no_grad():
        expected = reference.decode(z, return_dict=False)[0]
        got = ours.decode(z, return_dict=False)[0]
        expected_dist = reference.encode(x).latent_dist
        got_dist = ours.encode(x).latent_dist
    assert got.dtype == ours.dtype == torch.float32
    assert got.shape == (2, 3, 12 * ours.factor, 8 * ours.factor)
    for what, a, b in (
        ("decode", got, expected),
        ("encode mean", got_dist.mean, expected_dist.mean),
        ("encode std", got_dist.std, expected_dist.std),
    ):
        diff, scale = _diff(a, b)
        print(f"{name} {what}: max abs diff {diff:.3g} (scale {scale:.3g})", file=sys.stderr)
        assert diff <= 1e-4 * scale, what
    # as sdgen runs a half-precision VAE (channels-last): the same kernels in the same order, the same bits
    for model in (ours, reference):
        model.to(torch.bfloat16, memory_format=torch.channels_last)
    z, x = (t.to(torch.bfloat16, memory_format=torch.channels_last) for t in (z, x))
    with torch.no_grad():
        assert torch.equal(ours.decode(z)[0], reference.decode(z, return_dict=False)[0])
        assert torch.equal(ours.encode(x).latent_dist.std, reference.encode(x).latent_dist.std)
    assert ours.dtype == torch.bfloat16
    assert ours.config.block_out_channels == reference.config.block_out_channels
    assert ours.config.scaling_factor == reference.config.scaling_factor
    assert ours.config.latent_channels == reference.config.latent_channels
    assert ours.config.sample_size == reference.config.sample_size
    assert 2 ** (len(ours.config.block_out_channels) - 1) == ours.factor == (4 if name == "x4" else 8)


@pytest.mark.parametrize("name", ["sd1", "x4"])
def test_slicing_and_channels_last(name, tmp_path):
    arch, sd = _case(name, tmp_path)
    vae = _ours(arch, sd)
    z, x = _inputs(vae)
    with torch.no_grad():
        plain, dist = vae.decode(z)[0], vae.encode(x).latent_dist
        vae.enable_slicing()
        sliced, sliced_dist = vae.decode(z)[0], vae.encode(x).latent_dist
        vae.disable_slicing()
        # the batch items one by one: the same pixels (up to batched vs single kernels' rounding)
        assert _diff(sliced, plain)[0] <= 1e-5 * plain.abs().max().item()
        assert _diff(sliced_dist.mean, dist.mean)[0] <= 1e-5 * dist.mean.abs().max().item()

        vae.to(memory_format=torch.channels_last)
        last = vae.decode(z.to(memory_format=torch.channels_last))[0]
        assert _diff(last, plain)[0] <= 1e-4 * plain.abs().max().item()


@pytest.mark.parametrize("name", ["sd1", "x4"])
def test_tiling_is_close_to_untiled(name, tmp_path):
    arch, sd = _case(name, tmp_path)
    vae = _ours(arch, sd)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, 40, 36, generator=g)
    x = torch.rand(1, 3, 40 * vae.factor, 36 * vae.factor, generator=g) * 2 - 1
    with torch.no_grad():
        plain, dist = vae.decode(z)[0], vae.encode(x).latent_dist
        vae.enable_tiling(tile_latents=24)  # 2 x 2 tiles, overlapping by 8 and 12 latents
        tiled, tiled_dist = vae.decode(z)[0], vae.encode(x).latent_dist
    assert tiled.shape == plain.shape and tiled_dist.mean.shape == dist.mean.shape
    assert torch.isfinite(tiled).all() and torch.isfinite(tiled_dist.mean).all()
    # close, not equal: a tile's GroupNorm statistics and mid attention see only the tile, and the random
    # weights here make that matter more than a trained VAE's (measured: 0.10 and 0.13 for the decode, where
    # diffusers' tiling with the same tile size gives 0.14 and 0.17)
    for what, a, b in (("decode", tiled, plain), ("encode mean", tiled_dist.mean, dist.mean)):
        err = ((a - b).abs().mean() / b.abs().mean()).item()
        print(f"{name} tiled {what}: mean abs diff {err:.3g} of the mean abs value", file=sys.stderr)
        assert err <= 0.15, what


@pytest.mark.parametrize(("tile", "overlap", "size"), [(8, 2, (20, 13)), (8, 0, (16, 24)), (5, 2, (5, 30))])
def test_tiles_blend_to_the_untiled_result_of_a_local_function(tile, overlap, size):
    """Where the function is the same on a tile as on the whole (nearest upsampling, average pooling), the
    blended tiles are the untiled output: the blending weights sum to 1 everywhere."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 3, *size, generator=g)
    up = _tiled(lambda t: F.interpolate(t, scale_factor=4.0, mode="nearest"), z, tile, overlap, 1, 4)
    torch.testing.assert_close(up, F.interpolate(z, scale_factor=4.0, mode="nearest"))
    x = torch.randn(1, 3, size[0] * 4, size[1] * 4, generator=g)
    torch.testing.assert_close(_tiled(lambda t: F.avg_pool2d(t, 4), x, tile, overlap, 4, 1), F.avg_pool2d(x, 4))


@pytest.mark.parametrize(("family", "v"), [("sd1", False), ("sd2", False), ("sd2", True), ("x4", True)])
def test_full_size_names_and_shapes_are_the_original_checkpoints(family, v):
    config, _ = shipped_config(family_named(family), v)
    params = config["model"]["params"]
    first = params["first_stage_config"]["params"]
    with torch.device("meta"):
        vae = AutoencoderKL(first["ddconfig"], first["embed_dim"], params["scale_factor"])
    assert all(p.is_meta for p in vae.parameters()) and list(vae.buffers()) == []
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert shapes == ldm_layout.vae_layout(first["ddconfig"], first["embed_dim"])
    assert vae.factor == (4 if family == "x4" else 8)
    assert vae.config.scaling_factor == params["scale_factor"]


@pytest.mark.parametrize("name", ["sd1-wide", "x4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: never banded, the same bits
def test_bands_of_rows_give_the_unbanded_pixels(name, dtype, tmp_path, monkeypatch):
    """The CPU's banded layers (forced here on small inputs, in bands of 5 rows, so that a band's halo rows,
    the in-place conv and the upsampler's odd rows are all exercised): the same pixels within 1 level."""
    arch, sd = _case(name, tmp_path)
    vae = _ours(arch, sd).to(dtype, memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(1, 4, 11, 7, generator=g).to(dtype)
    x = (torch.rand(1, 3, 11 * vae.factor, 7 * vae.factor, generator=g) * 2 - 1).to(dtype)
    with torch.no_grad():
        plain, dist = vae.decode(z)[0], vae.encode(x).latent_dist
        monkeypatch.setattr(vae_module, "BAND_BYTES", 0)
        monkeypatch.setattr(vae_module, "BAND_ROWS", 5)
        banded, banded_dist = vae.decode(z)[0], vae.encode(x).latent_dist
    assert banded.shape == plain.shape and banded.dtype == dtype
    level = 2 / 255  # one 8-bit level of the [-1, 1] output
    diff = (banded.float() - plain.float()).abs().max().item()
    print(f"{name} {dtype}: banded decode max abs diff {diff:.3g} ({diff / level:.3g} levels)", file=sys.stderr)
    if dtype == torch.bfloat16:
        assert torch.equal(banded, plain) and torch.equal(banded_dist.mean, dist.mean)
        return
    assert 0 < diff <= 0.01 * level  # banded (not the same bits), and within a hundredth of a level
    assert _diff(banded_dist.mean, dist.mean)[0] <= 1e-4 * dist.mean.abs().max().item()
