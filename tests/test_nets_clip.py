"""sdgen.nets.clip against what sdgen ran before it: transformers' CLIPTextModel as build_text_encoder makes it."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from sdgen.checkpoints.build import build_text_encoder
from sdgen.checkpoints.ldm_config import Architecture, resolve
from sdgen.families import family_named
from sdgen.families.base import CLIP_PREFIX, OPENCLIP_PREFIX
from sdgen.nets.clip import (
    TextTransformer,
    apply_key_map,
    mapped_shapes,
    openclip_key_map,
    text_config,
    text_key_map,
)
from sdgen.testing import ldm_layout
from sdgen.tokenizer import tokenize

PROMPTS = ["a photo of a cat", ""]


def _arch(family: str, sd: dict[str, torch.Tensor], folder, layer: str | None = None) -> Architecture:
    ckpt, cfg = ldm_layout.write_tiny(family, folder)
    arch = resolve(sd, ckpt, cfg, None)
    if layer is not None:  # another FrozenOpenCLIPEmbedder layer than the yaml's
        config = {"model": {"params": dict(arch.params)}}
        config["model"]["params"]["cond_stage_config"] = {"target": arch.family.text.target, "params": {"layer": layer}}
        arch = dataclasses.replace(arch, config=config)
    return arch


def _wider_text(sd: dict[str, torch.Tensor], layout: str, width: int, layers: int) -> dict[str, torch.Tensor]:
    """``sd`` with its text encoder replaced by a random one of ``width`` (several heads: the tiny one has one)."""
    g = torch.Generator().manual_seed(1)
    prefix, shapes = (
        (CLIP_PREFIX, ldm_layout.clip_layout(width, layers))
        if layout == "clip"
        else (OPENCLIP_PREFIX, ldm_layout.openclip_layout(width, layers))
    )
    out = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    for name, shape in shapes.items():
        if len(shape) <= 1:  # norms ~1, biases ~0, as ldm_layout does
            base = 1.0 if name.endswith("weight") else 0.0
            out[prefix + name] = base + 0.02 * torch.randn(shape, generator=g)
        else:
            out[prefix + name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return out


def _ours(arch: Architecture, sd: dict[str, torch.Tensor]) -> TextTransformer:
    text = arch.family.text
    layer = arch.params["cond_stage_config"].get("params", {}).get("layer", "last")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    with torch.device("meta"):
        model = TextTransformer(**text_config(shapes, text.layout, layer))
    weights = apply_key_map(sd, text_key_map(sd, text.layout, layer))
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize(
    ("family", "width", "layer"),
    [("sd1", None, None), ("sd1", 128, None), ("sd2", None, None), ("sd2", 192, None), ("sd2", None, "last")],
    ids=["sd1", "sd1-2heads", "sd2-penultimate", "sd2-3heads", "sd2-last"],
)
def test_matches_transformers_clip_text_model(family, width, layer, tmp_path):
    sd = ldm_layout.random_state_dict(family, contrast=1.0)
    text = family_named(family).text
    if width is not None:
        sd = _wider_text(sd, text.layout, width, 3)
    arch = _arch(family, sd, tmp_path, layer)
    reference, ours = build_text_encoder(arch, sd, "test"), _ours(arch, sd)
    ids, _ = tokenize(PROMPTS, text.pad_id, text.unescape_html)
    tokens = torch.tensor(ids)
    with torch.no_grad():
        expected = reference(input_ids=tokens).last_hidden_state
        got = ours(input_ids=tokens).last_hidden_state
    assert got.shape == expected.shape == (2, 77, width or ldm_layout.TEXT_WIDTH)
    assert got.dtype == ours.dtype == torch.float32
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    print(f"{family} width={width} layer={layer}: max abs diff {diff:.3g} (scale {scale:.3g})", file=sys.stderr)
    assert diff <= 1e-5 * scale
    assert ours.config.hidden_act == reference.config.hidden_act == text.hidden_act
    assert ours.config.num_hidden_layers == reference.config.num_hidden_layers
    assert ours.config.hidden_size == reference.config.hidden_size


@pytest.mark.parametrize(
    ("layout", "width", "layers", "layer", "used", "activation"),
    [
        ("clip", 768, 12, "last", 12, "quick_gelu"),  # SD 1.x: CLIP ViT-L/14
        ("openclip", 1024, 24, "penultimate", 23, "gelu"),  # SD 2.x and the x4 upscaler: OpenCLIP ViT-H/14
        ("openclip", 1024, 24, "last", 24, "gelu"),
    ],
)
def test_text_config_and_names_of_full_size_encoders(layout, width, layers, layer, used, activation):
    prefix, layout_fn = (
        (CLIP_PREFIX, ldm_layout.clip_layout) if layout == "clip" else (OPENCLIP_PREFIX, ldm_layout.openclip_layout)
    )
    shapes = {prefix + k: s for k, s in layout_fn(width, layers).items()}
    config = text_config(shapes, layout, layer)
    assert config == {
        "vocab_size": ldm_layout.VOCAB,
        "width": width,
        "layers": used,
        "heads": width // 64,
        "mlp_width": 4 * width,
        "positions": 77,
        "activation": activation,
    }
    with torch.device("meta"):
        model = TextTransformer(**config)
    assert list(model.buffers()) == []  # position ids and the causal mask are made in forward
    params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(p.is_meta for p in model.parameters())
    assert params == mapped_shapes(shapes, text_key_map(shapes, layout, layer))


def test_old_clip_names_and_position_ids():
    """transformers < 4.17 saved no text_model. part; the position_ids buffer is never taken."""
    new = {CLIP_PREFIX + k: s for k, s in ldm_layout.clip_layout().items()}
    old = {k.replace("text_model.", ""): s for k, s in new.items()}
    for shapes in (new, old):
        shapes[CLIP_PREFIX + "text_model.embeddings.position_ids"] = (1, 77)
    maps = [text_key_map(s, "clip") for s in (new, old)]
    assert maps[0].keys() == maps[1].keys()
    assert not any("position_ids" in k for k in maps[0])
    assert mapped_shapes(new, maps[0]) == mapped_shapes(old, maps[1])


def test_openclip_q_k_v_are_views_of_in_proj():
    sd = {OPENCLIP_PREFIX + k: torch.randn(s) for k, s in ldm_layout.openclip_layout(64, 2).items()}
    weights = apply_key_map(sd, openclip_key_map(sd, "penultimate"))
    stacked = sd[OPENCLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"]
    parts = [weights[f"encoder.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(torch.cat(parts), stacked)
    assert all(p.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr() for p in parts)
    assert not any(k.startswith("encoder.layers.1.") for k in weights)  # the last resblock is not used
    assert not any("projection" in k or "logit_scale" in k for k in weights)


def test_half_precision_output_dtype():
    config = text_config({CLIP_PREFIX + k: s for k, s in ldm_layout.clip_layout(64, 1).items()}, "clip")
    model = TextTransformer(**config).to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model(torch.zeros(1, 77, dtype=torch.long)).last_hidden_state.dtype == torch.bfloat16
