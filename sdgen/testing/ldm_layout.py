"""Tiny random-weight checkpoints in the exact original (CompVis/Stability LDM) key layout, with their yaml.

The key names and shapes below are written from the original modules (openaimodel.UNetModel,
autoencoder.AutoencoderKL, HF CLIPTextModel for SD 1.x, open_clip's text tower for SD 2.x), so a file
made here loads through the same code path as a downloaded ``sd-v1-4.ckpt`` or ``v2-1_768-ema-pruned``.
GroupNorm is hard-coded to 32 groups in LDM, hence channel counts of 32 and 64.
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

TEXT_WIDTH = 64  # one 64-wide head, as in the real encoders
VOCAB = 49408

TINY_UNET = {
    "model_channels": 32,
    "channel_mult": [1, 2],
    "attention_resolutions": [1],
    "num_res_blocks": 1,
    "transformer_depth": 1,
    "context_dim": TEXT_WIDTH,
    "image_size": 32,
    "legacy": False,
    "use_spatial_transformer": True,
    "in_channels": 4,
    "out_channels": 4,
}
TINY_VAE = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def tiny_config(family: str) -> dict[str, Any]:
    """The tiny model's original-style inference yaml, as a dict."""
    unet = dict(TINY_UNET)
    params: dict[str, Any] = {
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "timesteps": 1000,
        "image_size": 32,
        "channels": 4,
        "conditioning_key": "crossattn",
        "scale_factor": 0.18215,
        "use_ema": False,
    }
    if family == "sd1":
        unet["num_heads"] = 2
        cond: dict[str, Any] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    elif family == "x4":
        # the x4 upscaler: 7 input channels (latents + the noised low-res image), a noise-level class embedding,
        # cross-attention only in the attention levels, a factor-4 VAE, its own noise schedule
        unet.update(
            in_channels=7,
            num_classes=1000,
            attention_resolutions=[2],
            num_heads=2,
            disable_self_attentions=[True, True],
            disable_middle_self_attn=False,
            use_linear_in_transformer=True,
        )
        cond = {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": "penultimate"},
        }
        params.update(
            parameterization="v",
            linear_start=0.0001,
            linear_end=0.02,
            scale_factor=0.08333,
            low_scale_key="lr",
            conditioning_key="hybrid-adm",
        )
        params["low_scale_config"] = {
            "target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
            "params": {"noise_schedule_config": {"linear_start": 0.0001, "linear_end": 0.02}, "max_noise_level": 350},
        }
    else:
        unet.update(num_head_channels=16, use_linear_in_transformer=True)
        cond = {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": "penultimate"},
        }
        if family == "sd2v":
            params["parameterization"] = "v"
    params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet}
    vae = dict(TINY_VAE, ch_mult=[1, 1, 1]) if family == "x4" else dict(TINY_VAE)
    params["first_stage_config"] = {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 4, "ddconfig": vae, "lossconfig": {"target": "torch.nn.Identity"}},
    }
    params["cond_stage_config"] = cond
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


# ---- key layouts -------------------------------------------------------------------------------------


def _norm(out: dict, name: str, c: int) -> None:
    out[f"{name}.weight"] = (c,)
    out[f"{name}.bias"] = (c,)


def _linear(out: dict, name: str, cin: int, cout: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (cout, cin)
    if bias:
        out[f"{name}.bias"] = (cout,)


def _conv(out: dict, name: str, cin: int, cout: int, k: int) -> None:
    out[f"{name}.weight"] = (cout, cin, k, k)
    out[f"{name}.bias"] = (cout,)


def _unet_resblock(out: dict, name: str, cin: int, cout: int, temb: int) -> None:
    _norm(out, f"{name}.in_layers.0", cin)
    _conv(out, f"{name}.in_layers.2", cin, cout, 3)
    _linear(out, f"{name}.emb_layers.1", temb, cout)
    _norm(out, f"{name}.out_layers.0", cout)
    _conv(out, f"{name}.out_layers.3", cout, cout, 3)
    if cin != cout:
        _conv(out, f"{name}.skip_connection", cin, cout, 1)


def _spatial_transformer(out: dict, name: str, ch: int, ctx: int, linear: bool, self_attn_ctx: bool) -> None:
    _norm(out, f"{name}.norm", ch)
    if linear:
        _linear(out, f"{name}.proj_in", ch, ch)
        _linear(out, f"{name}.proj_out", ch, ch)
    else:
        _conv(out, f"{name}.proj_in", ch, ch, 1)
        _conv(out, f"{name}.proj_out", ch, ch, 1)
    b = f"{name}.transformer_blocks.0"
    for attn, kv in (("attn1", ctx if self_attn_ctx else ch), ("attn2", ctx)):
        _linear(out, f"{b}.{attn}.to_q", ch, ch, bias=False)
        _linear(out, f"{b}.{attn}.to_k", kv, ch, bias=False)
        _linear(out, f"{b}.{attn}.to_v", kv, ch, bias=False)
        _linear(out, f"{b}.{attn}.to_out.0", ch, ch)
    _linear(out, f"{b}.ff.net.0.proj", ch, ch * 8)  # GEGLU: 2 x (4 x ch)
    _linear(out, f"{b}.ff.net.2", ch * 4, ch)
    for n in ("norm1", "norm2", "norm3"):
        _norm(out, f"{b}.{n}", ch)


def unet_layout(p: dict) -> dict[str, tuple]:
    """openaimodel.UNetModel's state dict (names without 'model.diffusion_model.')."""
    out: dict[str, tuple] = {}
    mc, temb = p["model_channels"], p["model_channels"] * 4
    linear = bool(p.get("use_linear_in_transformer", False))
    no_self = p.get("disable_self_attentions") or [False] * len(p["channel_mult"])
    _linear(out, "time_embed.0", mc, temb)
    _linear(out, "time_embed.2", temb, temb)
    if isinstance(p.get("num_classes"), int):
        out["label_emb.weight"] = (p["num_classes"], temb)
    _conv(out, "input_blocks.0.0", p["in_channels"], mc, 3)
    chans, ch, ds, k = [mc], mc, 1, 1
    for level, mult in enumerate(p["channel_mult"]):
        for _ in range(p["num_res_blocks"]):
            _unet_resblock(out, f"input_blocks.{k}.0", ch, mult * mc, temb)
            ch = mult * mc
            if ds in p["attention_resolutions"]:
                _spatial_transformer(out, f"input_blocks.{k}.1", ch, p["context_dim"], linear, no_self[level])
            chans.append(ch)
            k += 1
        if level != len(p["channel_mult"]) - 1:
            _conv(out, f"input_blocks.{k}.0.op", ch, ch, 3)
            chans.append(ch)
            ds *= 2
            k += 1
    _unet_resblock(out, "middle_block.0", ch, ch, temb)
    _spatial_transformer(out, "middle_block.1", ch, p["context_dim"], linear, False)
    _unet_resblock(out, "middle_block.2", ch, ch, temb)
    k = 0
    for level, mult in list(enumerate(p["channel_mult"]))[::-1]:
        for i in range(p["num_res_blocks"] + 1):
            _unet_resblock(out, f"output_blocks.{k}.0", ch + chans.pop(), mc * mult, temb)
            ch = mc * mult
            idx = 1
            if ds in p["attention_resolutions"]:
                _spatial_transformer(out, f"output_blocks.{k}.1", ch, p["context_dim"], linear, no_self[level])
                idx = 2
            if level and i == p["num_res_blocks"]:
                _conv(out, f"output_blocks.{k}.{idx}.conv", ch, ch, 3)
                ds //= 2
            k += 1
    _norm(out, "out.0", mc)
    _conv(out, "out.2", mc, p["out_channels"], 3)
    return out


def _vae_resblock(out: dict, name: str, cin: int, cout: int) -> None:
    _norm(out, f"{name}.norm1", cin)
    _conv(out, f"{name}.conv1", cin, cout, 3)
    _norm(out, f"{name}.norm2", cout)
    _conv(out, f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(out, f"{name}.nin_shortcut", cin, cout, 1)


def _vae_mid(out: dict, name: str, c: int) -> None:
    _vae_resblock(out, f"{name}.block_1", c, c)
    _norm(out, f"{name}.attn_1.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        _conv(out, f"{name}.attn_1.{n}", c, c, 1)
    _vae_resblock(out, f"{name}.block_2", c, c)


def vae_layout(dd: dict, embed_dim: int = 4) -> dict[str, tuple]:
    """autoencoder.AutoencoderKL's state dict (names without 'first_stage_model.')."""
    out: dict[str, tuple] = {}
    ch, mults, nrb, z = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"]
    _conv(out, "encoder.conv_in", dd["in_channels"], ch, 3)
    block_in = ch
    for i, m in enumerate(mults):
        block_in = ch * ([1] + list(mults))[i]
        for j in range(nrb):
            _vae_resblock(out, f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
        if i != len(mults) - 1:
            _conv(out, f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    _vae_mid(out, "encoder.mid", block_in)
    _norm(out, "encoder.norm_out", block_in)
    _conv(out, "encoder.conv_out", block_in, 2 * z if dd["double_z"] else z, 3)
    block_in = ch * mults[-1]
    _conv(out, "decoder.conv_in", z, block_in, 3)
    _vae_mid(out, "decoder.mid", block_in)
    for i in reversed(range(len(mults))):
        for j in range(nrb + 1):
            _vae_resblock(out, f"decoder.up.{i}.block.{j}", block_in, ch * mults[i])
            block_in = ch * mults[i]
        if i != 0:
            _conv(out, f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    _norm(out, "decoder.norm_out", block_in)
    _conv(out, "decoder.conv_out", block_in, dd["out_ch"], 3)
    _conv(out, "quant_conv", 2 * z, 2 * embed_dim, 1)
    _conv(out, "post_quant_conv", embed_dim, z, 1)
    return out


def clip_layout(width: int = TEXT_WIDTH, layers: int = 2) -> dict[str, tuple]:
    """HF CLIPTextModel as saved inside SD 1.x checkpoints (names after 'cond_stage_model.transformer.')."""
    out: dict[str, tuple] = {
        "text_model.embeddings.token_embedding.weight": (VOCAB, width),
        "text_model.embeddings.position_embedding.weight": (77, width),
    }
    for i in range(layers):
        b = f"text_model.encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(out, f"{b}.self_attn.{n}", width, width)
        _norm(out, f"{b}.layer_norm1", width)
        _linear(out, f"{b}.mlp.fc1", width, 4 * width)
        _linear(out, f"{b}.mlp.fc2", 4 * width, width)
        _norm(out, f"{b}.layer_norm2", width)
    _norm(out, "text_model.final_layer_norm", width)
    return out


def openclip_layout(width: int = TEXT_WIDTH, layers: int = 3) -> dict[str, tuple]:
    """open_clip's text tower as saved in SD 2.x checkpoints (names after 'cond_stage_model.model.')."""
    out: dict[str, tuple] = {
        "positional_embedding": (77, width),
        "text_projection": (width, width),
        "logit_scale": (),
        "token_embedding.weight": (VOCAB, width),
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}"
        out[f"{b}.attn.in_proj_weight"] = (3 * width, width)
        out[f"{b}.attn.in_proj_bias"] = (3 * width,)
        _linear(out, f"{b}.attn.out_proj", width, width)
        _norm(out, f"{b}.ln_1", width)
        _norm(out, f"{b}.ln_2", width)
        _linear(out, f"{b}.mlp.c_fc", width, 4 * width)
        _linear(out, f"{b}.mlp.c_proj", 4 * width, width)
    _norm(out, "ln_final", width)
    return out


def schedule_buffers(params: dict) -> dict[str, torch.Tensor]:
    """The DDPM schedule buffers LatentDiffusion stores in its checkpoints."""
    betas = np.linspace(params["linear_start"] ** 0.5, params["linear_end"] ** 0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    prev = np.append(1.0, ac[:-1])

    def f32(a):
        return torch.tensor(a, dtype=torch.float32)

    return {
        "betas": f32(betas),
        "alphas_cumprod": f32(ac),
        "alphas_cumprod_prev": f32(prev),
        "sqrt_alphas_cumprod": f32(np.sqrt(ac)),
        "sqrt_one_minus_alphas_cumprod": f32(np.sqrt(1 - ac)),
    }


def random_state_dict(family: str, seed: int = 0, contrast: float = 0.03) -> dict[str, torch.Tensor]:
    """Random weights in the original layout. Norm weights are ~1 and other weights small, so the
    tiny model's activations stay in range and the images are varied, not saturated."""
    config = tiny_config(family)
    params = config["model"]["params"]
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple] = {}
    shapes.update({"model.diffusion_model." + k: v for k, v in unet_layout(params["unet_config"]["params"]).items()})
    dd = params["first_stage_config"]["params"]["ddconfig"]
    shapes.update({"first_stage_model." + k: v for k, v in vae_layout(dd).items()})
    if family == "sd1":
        shapes.update({"cond_stage_model.transformer." + k: v for k, v in clip_layout().items()})
    else:
        shapes.update({"cond_stage_model.model." + k: v for k, v in openclip_layout().items()})
    sd = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if name.endswith("bias") or len(shape) <= 1:
            is_norm_weight = name.endswith("weight") and len(shape) == 1
            base = 1.0 if is_norm_weight else 0.0
            sd[name] = base + 0.02 * torch.randn(shape, generator=g)
        else:
            sd[name] = torch.randn(shape, generator=g) / max(fan_in, 1) ** 0.5
    # Keep the decoded pixels near mid-grey with modest contrast: the dwtDct watermark (like JPEG) does
    # not survive on saturated white noise, and real SD images are not white noise either.
    # (Parity checks against the reference pass contrast=1.0 to keep every pixel difference visible.)
    sd["first_stage_model.decoder.conv_out.weight"] *= contrast
    sd.update(schedule_buffers(params))
    if family == "x4":
        low = schedule_buffers(params["low_scale_config"]["params"]["noise_schedule_config"] | {})
        sd.update({f"low_scale_model.{k}": v for k, v in low.items()})
    return sd


# ---- files --------------------------------------------------------------------------------------------


def _fake_lightning_module() -> tuple[type, list[str]]:
    """A class that pickles as pytorch_lightning's ModelCheckpoint, without Lightning installed."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mods = [types.ModuleType(n) for n in names]
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    mods[-1].ModelCheckpoint = cls  # type: ignore[attr-defined]
    for n, m in zip(names, mods, strict=True):
        sys.modules.setdefault(n, m)
    return sys.modules[names[-1]].ModelCheckpoint, names


def save_ckpt(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A Lightning-style .ckpt: state_dict plus epoch, global_step and a ModelCheckpoint callback entry."""
    added = [n for n in ("pytorch_lightning",) if n not in sys.modules]
    cls, names = _fake_lightning_module()
    callback = cls()
    callback.__dict__.update({"monitor": "val/loss_simple_ema", "best_model_score": np.float64(0.123)})
    obj = {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {cls: {"best_model_score": np.float64(0.12)}},
        "callback_obj": callback,
    }
    try:
        torch.save(obj, path, pickle_protocol=2)
    finally:
        if added:
            for n in names:
                sys.modules.pop(n, None)


def save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def write_tiny(
    family: str, folder: Path, fmt: str = "safetensors", seed: int = 0, contrast: float = 0.03
) -> tuple[Path, Path]:
    """Write a tiny checkpoint and its yaml into ``folder``; return (checkpoint path, yaml path)."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(family, seed, contrast)
    ckpt = folder / f"tiny-{family}.{fmt}"
    (save_safetensors if fmt == "safetensors" else save_ckpt)(sd, ckpt)
    cfg = folder / f"tiny-{family}.yaml"
    cfg.write_text(yaml.safe_dump(copy.deepcopy(tiny_config(family)), sort_keys=False))
    return ckpt, cfg
