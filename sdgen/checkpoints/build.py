"""Build diffusers/transformers modules from an original LDM yaml plus a state dict, offline.

sdgen itself runs its own networks (sdgen.checkpoints.nets); these builders give the stock modules that the
parity tests compare them with, that the tests save as diffusers folders, and that bench/ runs the stock
diffusers pipeline on.

The yaml gives the UNet and VAE hyperparameters; the state dict gives the text encoder's size (width, layers,
MLP size; heads are 64 wide as in CLIP ViT-L/14 and OpenCLIP ViT-H/14). Key renaming is diffusers'
single-file conversion. Modules are created with their parameters on the meta device and the checkpoint's
tensors are assigned to them, so nothing is randomly initialised only to be overwritten.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sdgen.checkpoints.ldm_config import Architecture
from sdgen.checkpoints.nets import check_weights
from sdgen.errors import ConfigError
from sdgen.families.base import CLIP_PREFIX, OPENCLIP_PREFIX

TEXT_HEAD_WIDTH = 64
CLIP_BOS, CLIP_EOS = 49406, 49407


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Create nn.Parameters on the meta device (buffers stay real: position ids, masks)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def assign_weights(module: nn.Module, weights: dict[str, torch.Tensor], what: str, source: str) -> None:
    """Load ``weights`` into a meta-initialised module; every parameter must be provided with its shape."""
    expected = module.state_dict()
    required = [k for k, v in expected.items() if v.is_meta]  # real buffers (position ids) may be absent
    check_weights(expected, weights, required, what, source)
    usable = {k: v for k, v in weights.items() if k in expected}
    module.load_state_dict(usable, strict=False, assign=True)


def unet_config(arch: Architecture) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config from the yaml's unet_config (openaimodel.UNetModel)."""
    p = arch.params["unet_config"]["params"]
    mc, mults = p["model_channels"], list(p["channel_mult"])
    attn = set(p.get("attention_resolutions", []))
    with_attention = [2**i in attn for i in range(len(mults))]
    if p.get("num_head_channels", -1) not in (-1, None):
        heads = [mc * m // p["num_head_channels"] for m in mults]  # SD 2.x: 64-wide heads
    else:
        heads = [p["num_heads"]] * len(mults)  # SD 1.x: a fixed count
    depth = p.get("transformer_depth", 1)
    config: dict[str, Any] = {
        "sample_size": p.get("image_size", 64),
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "block_out_channels": [mc * m for m in mults],
        "layers_per_block": p["num_res_blocks"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)],
        "cross_attention_dim": p["context_dim"],
        "attention_head_dim": heads,
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": depth if isinstance(depth, int) else list(depth),
        # The reference computes attention scores in fp32 (ATTN_PRECISION=fp32) for SD 2.x.
        "upcast_attention": arch.family.upcast_attention,
    }
    if isinstance(p.get("num_classes"), int):
        config["num_class_embeds"] = p["num_classes"]  # the x4 upscaler's noise-level embedding
    if p.get("disable_self_attentions"):
        config["only_cross_attention"] = list(p["disable_self_attentions"])
    return config


def vae_config(arch: Architecture) -> dict[str, Any]:
    dd = arch.params["first_stage_config"]["params"]["ddconfig"]
    n = len(dd["ch_mult"])
    return {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "latent_channels": dd["z_channels"],
        "layers_per_block": dd["num_res_blocks"],
        "sample_size": dd.get("resolution", 256),
        "scaling_factor": arch.params.get("scale_factor", 0.18215),
    }


def build_unet(arch: Architecture, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = unet_config(arch)
    try:
        weights = convert_ldm_unet_checkpoint(sd, config)
    except (KeyError, IndexError, RuntimeError, ValueError) as e:
        raise ConfigError(f"{source}: the UNet weights do not match the config ({type(e).__name__}: {e})") from e
    with meta_parameters():
        unet = UNet2DConditionModel(**config)
    assign_weights(unet, weights, "UNet", source)
    return unet.eval()


def build_vae(arch: Architecture, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = vae_config(arch)
    vae_sd = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    try:
        weights = convert_ldm_vae_checkpoint(vae_sd, config)
    except (KeyError, IndexError, RuntimeError, ValueError) as e:
        raise ConfigError(f"{source}: the VAE weights do not match the config ({type(e).__name__}: {e})") from e
    with meta_parameters():
        vae = AutoencoderKL(**config)
    assign_weights(vae, weights, "VAE", source)
    return vae.eval()


def _count_layers(sd: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def build_text_encoder(arch: Architecture, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The text encoder as a transformers CLIPTextModel (its pad id is the family's)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text = arch.family.text
    if text.layout == "clip":
        weights = _clip_weights(sd)
        width = weights["text_model.embeddings.token_embedding.weight"].shape
        layers = _count_layers(weights, "text_model.encoder.layers.")
        inner = weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        positions = weights["text_model.embeddings.position_embedding.weight"].shape[0]
    else:
        layer = arch.params["cond_stage_config"].get("params", {}).get("layer", "last")
        weights, width, layers, inner, positions = _openclip_weights(sd, layer)
    config = CLIPTextConfig(
        vocab_size=width[0],
        hidden_size=width[1],
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=width[1] // TEXT_HEAD_WIDTH,
        max_position_embeddings=positions,
        hidden_act=text.hidden_act,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
        pad_token_id=text.pad_id,
        projection_dim=width[1],
    )
    with meta_parameters():
        model = CLIPTextModel(config)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 flattened it
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    assign_weights(model, weights, "text encoder", source)
    return model.eval()


def _clip_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if not k.startswith(CLIP_PREFIX):
            continue
        name = k[len(CLIP_PREFIX) :]
        if not name.startswith("text_model."):  # checkpoints saved with transformers < 4.17 lack it
            name = "text_model." + name
        if not name.endswith("position_ids"):  # sometimes stored corrupted (as floats); rebuilt instead
            out[name] = v
    return out


def _openclip_weights(sd: dict[str, torch.Tensor], layer: str):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    total = _count_layers(sd, OPENCLIP_PREFIX + "transformer.resblocks.")
    used = total - 1 if layer == "penultimate" else total
    if used < 1:
        raise ConfigError(f"the OpenCLIP text encoder has {total} layers; layer={layer!r} needs more")
    drop = tuple(f"{OPENCLIP_PREFIX}transformer.resblocks.{i}." for i in range(used, total))
    kept = {k: v for k, v in sd.items() if k.startswith(OPENCLIP_PREFIX) and not k.startswith(drop)}

    class _Width:  # convert_open_clip_checkpoint reads config.hidden_size when there is no projection
        config = type("C", (), {"hidden_size": sd[OPENCLIP_PREFIX + "token_embedding.weight"].shape[1]})

    weights = convert_open_clip_checkpoint(_Width, kept)
    weights.pop("text_projection.weight", None)  # the encoder's hidden states are used, never the projection
    width = tuple(weights["text_model.embeddings.token_embedding.weight"].shape)
    inner = weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    positions = weights["text_model.embeddings.position_embedding.weight"].shape[0]
    return weights, width, used, inner, positions
