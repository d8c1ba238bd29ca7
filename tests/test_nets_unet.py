"""sdgen.nets.unet against what sdgen ran before it: diffusers' UNet2DConditionModel as build_unet makes it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sdgen.checkpoints.build import build_unet
from sdgen.checkpoints.ldm_config import resolve, shipped_config
from sdgen.errors import ConfigError
from sdgen.families import family_named
from sdgen.nets import unet as unet_module
from sdgen.nets.unet import UNet
from sdgen.testing import ldm_layout

PREFIX = "model.diffusion_model."


def _models(family: str, folder: Path):
    sd = ldm_layout.random_state_dict(family, contrast=1.0)
    ckpt, cfg = ldm_layout.write_tiny(family, folder)
    arch = resolve(sd, ckpt, cfg, None)
    with torch.device("meta"):
        ours = UNet(arch.params["unet_config"]["params"])
    weights = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    ours.load_state_dict(weights, strict=True, assign=True)
    # frozen as sdgen's loader makes them (a weight that requires grad takes another CPU bf16 linear kernel)
    return build_unet(arch, sd, "test").requires_grad_(False), ours.requires_grad_(False).eval()


def _inputs(family: str, size: tuple[int, int], batch: int = 2):
    g = torch.Generator().manual_seed(7)
    channels = 7 if family == "x4" else 4
    x = torch.randn(batch, channels, *size, generator=g)
    context = torch.randn(batch, 77, ldm_layout.TEXT_WIDTH, generator=g)
    t = torch.tensor([999.0, 321.0][:batch])
    extra = {"class_labels": torch.tensor([20, 350][:batch])} if family == "x4" else {}
    return x, t, context, extra


@pytest.mark.parametrize("family", ["sd1", "sd2v", "x4"])
@pytest.mark.parametrize("size", [(8, 12), (9, 7)])  # (9, 7): odd sizes, upsampled to the skip's size
def test_matches_diffusers_unet(family, size, tmp_path):
    reference, ours = _models(family, tmp_path)
    x, t, context, extra = _inputs(family, size)
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context, return_dict=False, **extra)[0]
        got = ours(x, t, encoder_hidden_states=context, return_dict=False, **extra)[0]
    assert got.shape == expected.shape == (2, 4, *size)
    diff, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    print(f"{family} {size}: max abs diff {diff:.3g} (scale {scale:.3g})", file=sys.stderr)
    assert diff <= 1e-5 * scale
    # as sdgen runs a half-precision UNet (channels-last)
    for model in (ours, reference):
        model.to(torch.bfloat16, memory_format=torch.channels_last)
    x, context = x.to(torch.bfloat16, memory_format=torch.channels_last), context.to(torch.bfloat16)
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context, return_dict=False, **extra)[0]
        got = ours(x, t, encoder_hidden_states=context, return_dict=False, **extra)[0]
    assert got.dtype == torch.bfloat16 == ours.dtype
    assert torch.equal(got, expected)  # the same kernels in the same order: the same bits
    assert ours.config.in_channels == reference.config.in_channels
    assert ours.config.out_channels == reference.config.out_channels
    assert ours.config.sample_size == reference.config.sample_size


@pytest.mark.parametrize("family", ["sd1", "x4"])
def test_sliced_attention_gives_the_same_prediction(family, tmp_path):
    _, ours = _models(family, tmp_path)
    x, t, context, extra = _inputs(family, (8, 8))
    with torch.no_grad():
        plain = ours(x, t, context, **extra)[0]
        for size in ("auto", "max", 3):
            ours.set_attention_slice(size)
            sliced = ours(x, t, context, **extra)[0]
            assert (sliced - plain).abs().max().item() <= 1e-5 * plain.abs().max().item(), size
        ours.set_attention_slice(None)
        assert torch.equal(ours(x, t, context, **extra)[0], plain)


def test_one_timestep_for_the_whole_batch(tmp_path):
    _, ours = _models("sd1", tmp_path)
    x, _, context, _ = _inputs("sd1", (8, 8))
    with torch.no_grad():
        each = ours(x, torch.tensor([500.0, 500.0]), context)[0]
        assert torch.equal(ours(x, torch.tensor(500.0), context)[0], each)
        assert torch.equal(ours(x, 500, context)[0], each)


def test_the_upscaler_needs_its_noise_level(tmp_path):
    _, ours = _models("x4", tmp_path)
    x, t, context, _ = _inputs("x4", (8, 8))
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, t, context)


def test_refuses_unets_it_does_not_implement():
    with pytest.raises(ConfigError, match="spatial-transformer"):
        UNet(dict(ldm_layout.TINY_UNET, num_heads=2, use_spatial_transformer=False))
    with pytest.raises(ConfigError, match="transformer_depth"):
        UNet(dict(ldm_layout.TINY_UNET, num_heads=2, transformer_depth=[1, 1, 1]))


@pytest.mark.parametrize(("family", "v"), [("sd1", False), ("sd2", False), ("sd2", True), ("x4", True)])
def test_full_size_names_and_shapes_are_the_original_checkpoints(family, v):
    config, _ = shipped_config(family_named(family), v)
    params = config["model"]["params"]["unet_config"]["params"]
    with torch.device("meta"):
        unet = UNet(params)
    assert all(p.is_meta for p in unet.parameters()) and list(unet.buffers()) == []
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert shapes == ldm_layout.unet_layout(params)
    heads = {m.heads for m in unet.modules() if isinstance(m, unet_module.Attention)}
    assert heads == ({8} if family in ("sd1", "x4") else {5, 10, 20})  # SD 2.x: 64-wide heads


@pytest.mark.parametrize("family", ["sd1", "x4"])  # x4: attn1 attends to the text too (disable_self_attentions)
def test_fused_projections_give_the_same_prediction_in_the_same_memory(family, tmp_path):
    _, ours = _models(family, tmp_path)
    x, t, context, extra = _inputs(family, (8, 8))
    count = sum(p.numel() for p in ours.parameters())
    with torch.no_grad():
        plain = ours(x, t, context, **extra)[0]
        ours.fuse_qkv_projections()
        ours.fuse_qkv_projections()  # a second call changes nothing
        fused = ours(x, t, context, **extra)[0]
    assert sum(p.numel() for p in ours.parameters()) == count
    assert not any(name.endswith(("to_k.weight", "to_v.weight")) for name, _ in ours.named_parameters())
    assert (fused - plain).abs().max().item() <= 1e-5 * plain.abs().max().item()
