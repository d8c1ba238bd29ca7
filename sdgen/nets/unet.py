"""The denoising UNet of Stable Diffusion (``ldm.modules.diffusionmodules.openaimodel.UNetModel``) in plain torch.

The module tree, and so every parameter name and shape, is the original one (``input_blocks.1.0.in_layers.0``,
``middle_block.1.transformer_blocks.0.attn2.to_k``, ``output_blocks.2.2.conv``, ``label_emb``, ...), so a
checkpoint's ``model.diffusion_model.`` tensors load without renaming. It covers the spatial-transformer
UNets of SD 1.x (a fixed head count, 1x1-conv projections), SD 2.x (64-wide heads, linear projections) and
the x4 upscaler (a noise-level class embedding, cross-attention in place of self-attention where
``disable_self_attentions`` says so).

The numerics are those of diffusers' ``UNet2DConditionModel`` converted from the same weights, which sdgen ran
before: GroupNorm and LayerNorm in the working dtype, the sinusoidal timestep embedding in float32 then cast,
attention through ``scaled_dot_product_attention`` (as diffusers' ``AttnProcessor2_0``), GEGLU feed-forward.
Only torch is imported (diffusers costs seconds to import).
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdgen.errors import ConfigError
from sdgen.nets import Embedding

GROUPS = 32  # LDM's normalization(): GroupNorm(32, C) ...
RESBLOCK_EPS = 1e-5  # ... with torch's default eps in the residual blocks and at the output
TRANSFORMER_EPS = 1e-6  # ... and Normalize()'s 1e-6 before each spatial transformer
MAX_PERIOD = 10000  # the sinusoidal timestep embedding's longest period


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[b] timesteps -> [b, dim] float32 features: cos then sin of t at geometrically spaced frequencies."""
    half = dim // 2
    exponent = -math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """norm, swish, 3x3 conv; plus the projected time embedding; norm, swish, 3x3 conv; plus the input
    (through a 1x1 conv where the channel count changes). Dropout is 0 at inference and left out."""

    def __init__(self, cin: int, cout: int, emb_channels: int) -> None:
        super().__init__()
        # swish in place on the norms' fresh outputs (not on the time embedding, which every block reads)
        norm_in, norm_out = nn.GroupNorm(GROUPS, cin, eps=RESBLOCK_EPS), nn.GroupNorm(GROUPS, cout, eps=RESBLOCK_EPS)
        self.in_layers = nn.Sequential(norm_in, nn.SiLU(inplace=True), _conv3(cin, cout))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, cout))
        self.out_layers = nn.Sequential(norm_out, nn.SiLU(inplace=True), nn.Identity(), _conv3(cout, cout))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.out_layers(self.in_layers(x).add_(self.emb_layers(emb)[:, :, None, None]))
        # out of place: in bf16 the in-place sum differs from diffusers' in the last bit for the x4 UNet
        return self.skip_connection(x) + h


class Attention(nn.Module):
    """Multi-head attention of ``heads`` heads over [b, n, dim] queries and [b, m, context] keys/values."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.slice_size: int | None = None  # heads (x batch) per attention call; None: all at once
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Identity())
        self.fused: nn.Linear | None = None  # q, k, v (self-attention) or k, v (cross) in one matmul

    def fuse_projections(self, self_attention: bool) -> None:
        """Replace the separate projections that read the same input by one wider linear layer (one matmul
        instead of two or three; for --compile). The weights move into it: no memory is added."""
        names = ("to_q", "to_k", "to_v") if self_attention else ("to_k", "to_v")
        parts = [getattr(self, n).weight for n in names]
        self.fused = nn.Linear(parts[0].shape[1], sum(w.shape[0] for w in parts), bias=False)
        self.fused.to(parts[0].device, parts[0].dtype)
        self.fused.weight = nn.Parameter(torch.cat(parts), requires_grad=False)
        for n in names:
            delattr(self, n)

    def projections(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fused is None:
            return self.to_q(x), self.to_k(context), self.to_v(context)
        if hasattr(self, "to_q"):  # k and v fused (cross-attention)
            return (self.to_q(x), *self.fused(context).chunk(2, dim=-1))
        return self.fused(x).chunk(3, dim=-1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]

        def split(t: torch.Tensor) -> torch.Tensor:  # [b, n, dim] -> [b, heads, n, head width]
            return t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        q, k, v = (split(t) for t in self.projections(x, context))
        if self.slice_size is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # the out-of-memory fallback: a few (batch, head) pairs at a time, a smaller score matrix
            q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
            step = self.slice_size
            parts = [
                F.scaled_dot_product_attention(q[i : i + step], k[i : i + step], v[i : i + step])
                for i in range(0, q.shape[0], step)
            ]
            out = torch.cat(parts).unflatten(0, (b, self.heads))
        out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3]).to(q.dtype)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention (or, with ``only_cross``, a second cross-attention), cross-attention to the
    text, and a feed-forward layer, each added to its input."""

    def __init__(self, dim: int, context_dim: int, heads: int, only_cross: bool) -> None:
        super().__init__()
        self.only_cross = only_cross
        self.attn1 = Attention(dim, context_dim if only_cross else dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = self.attn1(h, context if self.only_cross else h) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, project in, ``depth`` transformer blocks over the h*w pixels as tokens, project out, plus
    the input. SD 1.x projects with 1x1 convolutions before flattening, SD 2.x with linear layers after."""

    def __init__(self, ch: int, heads: int, depth: int, context_dim: int, linear: bool, only_cross: bool) -> None:
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(GROUPS, ch, eps=TRANSFORMER_EPS)
        self.proj_in: nn.Module = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(ch, context_dim, heads, only_cross) for _ in range(depth)
        )
        self.proj_out: nn.Module = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.linear:
            tokens = self.proj_in(tokens)
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.linear:
            tokens = self.proj_out(tokens)
        out = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        if not self.linear:
            out = self.proj_out(out)
        return out + x


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to ``size`` (twice the input, or one less where the matching input
    level had an odd size), then a 3x3 conv."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = _conv3(ch, ch)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        dtype = x.dtype  # nearest upsampling is exact; bf16 is upsampled in fp32, as diffusers does
        up = F.interpolate(x.float() if dtype == torch.bfloat16 else x, size=tuple(size), mode="nearest")
        return self.conv(up.to(dtype))


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class Level(nn.ModuleList):
    """One entry of ``input_blocks`` / ``output_blocks`` (LDM's TimestepEmbedSequential): a residual block,
    maybe a spatial transformer, maybe a down- or upsampler (or, first of all, the input convolution)."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, up_size: Sequence[int]
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x


def _per_level(value: Any, levels: int, name: str) -> list:
    if isinstance(value, int | bool):
        return [value] * levels
    if isinstance(value, Sequence) and len(value) == levels:
        return list(value)
    raise ConfigError(f"unet_config: {name} {value!r} must be one value or one per channel_mult level ({levels})")


class UNet(nn.Module):
    """openaimodel.UNetModel for inference, with diffusers' calling convention where sdgen uses it.

    ``params`` is the yaml's ``model.params.unet_config.params``.
    """

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__()
        p = params
        if not p.get("use_spatial_transformer", False) or p.get("context_dim") is None:
            raise ConfigError("unet_config: only spatial-transformer UNets with a context_dim (Stable Diffusion's)")
        mc, mults = p["model_channels"], list(p["channel_mult"])
        levels, emb_channels, context_dim = len(mults), p["model_channels"] * 4, p["context_dim"]
        head_width = p.get("num_head_channels", -1)
        depth = _per_level(p.get("transformer_depth", 1), levels, "transformer_depth")
        only_cross = _per_level(p.get("disable_self_attentions") or False, levels, "disable_self_attentions")
        attention_at = set(p.get("attention_resolutions", []))
        linear = bool(p.get("use_linear_in_transformer", False))

        def transformer(ch: int, level: int, only: bool) -> SpatialTransformer:
            heads = ch // head_width if head_width not in (-1, None) else p["num_heads"]
            return SpatialTransformer(ch, heads, depth[level], context_dim, linear, only)

        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        num_classes = p.get("num_classes")
        self.label_emb = Embedding(num_classes, emb_channels) if isinstance(num_classes, int) else None
        self.input_blocks = nn.ModuleList([Level([nn.Conv2d(p["in_channels"], mc, 3, padding=1)])])
        skips, ch, ds = [mc], mc, 1
        for level, mult in enumerate(mults):
            for _ in range(p["num_res_blocks"]):
                layers: list[nn.Module] = [ResBlock(ch, mult * mc, emb_channels)]
                ch = mult * mc
                if ds in attention_at:
                    layers.append(transformer(ch, level, only_cross[level]))
                self.input_blocks.append(Level(layers))
                skips.append(ch)
            if level != levels - 1:
                self.input_blocks.append(Level([Downsample(ch)]))
                skips.append(ch)
                ds *= 2
        middle_only_cross = bool(p.get("disable_middle_self_attn", False))
        self.middle_block = Level(
            [
                ResBlock(ch, ch, emb_channels),
                transformer(ch, levels - 1, middle_only_cross),
                ResBlock(ch, ch, emb_channels),
            ]
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(mults))[::-1]:
            for i in range(p["num_res_blocks"] + 1):
                layers = [ResBlock(ch + skips.pop(), mc * mult, emb_channels)]
                ch = mc * mult
                if ds in attention_at:
                    layers.append(transformer(ch, level, only_cross[level]))
                if level and i == p["num_res_blocks"]:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Level(layers))
        self.out = nn.Sequential(
            nn.GroupNorm(GROUPS, ch, eps=RESBLOCK_EPS), nn.SiLU(inplace=True), _conv3(mc, p["out_channels"])
        )
        self.config = types.SimpleNamespace(
            in_channels=p["in_channels"], out_channels=p["out_channels"], sample_size=p.get("image_size", 64)
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fuse_qkv_projections(self) -> None:
        """One matmul for each attention's q, k and v (self-attention) or k and v (cross-attention)."""
        for module in self.modules():
            if isinstance(module, TransformerBlock):
                if module.attn1.fused is None:
                    module.attn1.fuse_projections(self_attention=not module.only_cross)
                if module.attn2.fused is None:
                    module.attn2.fuse_projections(self_attention=False)

    def set_attention_slice(self, slice_size: str | int | None) -> None:
        """Attention a few heads at a time (sdgen's out-of-memory fallback): "auto" for half of each layer's
        heads, "max" for one, an int for that many, None for all at once (the default)."""
        for module in self.modules():
            if isinstance(module, Attention):
                if slice_size == "auto":
                    module.slice_size = max(module.heads // 2, 1)
                elif slice_size == "max":
                    module.slice_size = 1
                else:
                    module.slice_size = None if slice_size is None else int(slice_size)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        """Noisy latents [b, in, h, w] at ``timesteps`` ([b], [] or a number), text features [b, 77, d]
        (and for the x4 upscaler the noise level as ``class_labels``) -> ``(prediction,)``, [b, out, h, w].
        Always a tuple: ``return_dict`` is accepted for diffusers' calling convention only."""
        t = torch.as_tensor(timesteps, device=x.device)
        t = t.reshape(-1).expand(x.shape[0]) if t.dim() == 0 or t.numel() == 1 else t
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if self.label_emb is not None:
            if class_labels is None:
                raise ValueError("this UNet (num_classes) needs class_labels")
            emb = emb + self.label_emb(class_labels).to(x.dtype)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, encoder_hidden_states, ())
            skips.append(h)
        h = self.middle_block(h, emb, encoder_hidden_states, ())
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # an upsampler brings h to the size of the skip the next block joins it with
            h = block(h, emb, encoder_hidden_states, skips[-1].shape[-2:] if skips else ())
        return (self.out(h),)
