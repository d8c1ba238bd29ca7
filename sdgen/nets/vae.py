"""The KL autoencoder of Stable Diffusion (``ldm.models.autoencoder.AutoencoderKL``) in plain torch.

The module tree, and so every parameter name and shape, is the original one (``encoder.down.0.block.0.norm1``,
``decoder.up.3.upsample.conv``, ``quant_conv``, ...), so a checkpoint's ``first_stage_model.`` tensors load
without renaming. It covers SD 1.x/2.x (``ch_mult`` [1, 2, 4, 4]: 8x) and the x4 upscaler ([1, 2, 4]: 4x).

The numerics are those of diffusers' ``AutoencoderKL`` converted from the same weights, which sdgen ran
before: GroupNorm in the working dtype, ``F.silu``, and the mid-block attention as one head of width C over
the h*w tokens through ``scaled_dot_product_attention``, its 1x1 convolutions applied as linear layers on
the tokens. Only torch is imported (diffusers costs seconds to import).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sdgen.errors import ConfigError

GROUPS = 32  # LDM's Normalize(): GroupNorm(32, C, eps=1e-6) everywhere
EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps the log-variance to this
TILE_LATENTS = 64  # tiled VAE: tiles of 64 x 64 latents (512 px at 8x, 256 px at 4x) ...
TILE_OVERLAP = 0.25  # ... overlapping by a quarter (16 latents), blended linearly across the overlap


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=EPS)


class ResnetBlock(nn.Module):
    """norm, swish, 3x3 conv, twice, plus the input (through a 1x1 conv where the channel count changes).
    The VAE's blocks have no time embedding; dropout is 0 at inference and left out."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _in_bands(x):
            h = norm_swish_conv_in_bands(x, self.norm1, self.conv1)
            h = norm_swish_conv_in_bands(h, self.norm2, self.conv2, in_place=True)
            for r0, r1 in _bands(x.shape[2]):
                rows = x[:, :, r0:r1]
                h[:, :, r0:r1] += self.nin_shortcut(rows) if self.nin_shortcut is not None else rows
            return h
        # swish in place on the norms' fresh outputs, the residual added in place: fewer large tensors alive
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x), inplace=True))), inplace=True))
        return h.add_(self.nin_shortcut(x) if self.nin_shortcut is not None else x)


# ---- bands of rows (the CPU's large activations) -------------------------------------------------------
# At 512 px the decoder's last levels hold tensors of 128-256 MiB in fp32 (576 MiB at 768 px), and a plain
# norm -> swish -> conv keeps three or four of them alive. On the CPU such layers run in bands of rows: the
# norm's statistics over the whole input first, then per band its rows plus one above and below through the
# norm, swish and the same conv module, so that only the input, the output and one band's temporaries
# exist. In fp32 the pixels are the unbanded ones within 0.001 level (the statistics are summed in another
# order). Not in bf16: there a norm output one rounding step off now and then grows, through the decoder, to
# several levels (4.5 on the tiny test VAE at full contrast), so half precision keeps the plain path.
BAND_BYTES = 32 << 20  # inputs larger than this go in bands ...
BAND_ROWS = 64  # ... of this many output rows


def _empty_like_rows(band: torch.Tensor, height: int) -> torch.Tensor:
    """An uninitialised tensor like ``band`` (dtype, device, memory format) but ``height`` rows tall."""
    last = band.is_contiguous(memory_format=torch.channels_last) and not band.is_contiguous()
    layout = torch.channels_last if last else torch.contiguous_format
    shape = (*band.shape[:2], height, band.shape[3])
    return torch.empty(shape, dtype=band.dtype, device=band.device, memory_format=layout)


def _in_bands(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or torch.compiler.is_compiling():
        return False
    return x.numel() * x.element_size() > BAND_BYTES and x.shape[2] > BAND_ROWS


def _bands(height: int) -> list[tuple[int, int]]:
    return [(r0, min(r0 + BAND_ROWS, height)) for r0 in range(0, height, BAND_ROWS)]


def _group_statistics(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and group, the mean and variance of ``x`` in float32, summed band by band (two passes)."""
    b, c, h, w = x.shape
    count = c // groups * h * w
    total = x.new_zeros((b, groups), dtype=torch.float32)
    for r0, r1 in _bands(h):
        total += x[:, :, r0:r1].float().unflatten(1, (groups, -1)).sum(dim=(2, 3, 4))
    mean = total / count
    squares = torch.zeros_like(total)
    for r0, r1 in _bands(h):
        centred = x[:, :, r0:r1].float().unflatten(1, (groups, -1)) - mean[:, :, None, None, None]
        squares += centred.square().sum(dim=(2, 3, 4))
    return mean, squares / count


def _norm_swish(rows: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """swish(norm(x)) of some rows of x, given x's statistics: as GroupNorm computes it, x * scale + shift
    in float32 with scale = gamma / sqrt(var + eps) and shift = beta - mean * scale, then the input's dtype."""
    b, c = rows.shape[:2]
    per_group = (var + norm.eps).rsqrt()
    assert norm.weight is not None and norm.bias is not None  # SD's norms are affine
    scale = per_group.repeat_interleave(c // norm.num_groups, dim=1) * norm.weight.float()
    shift = norm.bias.float() - mean.repeat_interleave(c // norm.num_groups, dim=1) * scale
    out = torch.addcmul(shift[:, :, None, None], rows.float(), scale[:, :, None, None]).to(rows.dtype)
    return F.silu(out, inplace=True)


def norm_swish_conv_in_bands(
    x: torch.Tensor, norm: nn.GroupNorm, conv: nn.Conv2d, in_place: bool = False
) -> torch.Tensor:
    """``conv(swish(norm(x)))`` for a 3x3 (padding 1) or 1x1 ``conv``, band by band. ``in_place``: the output
    (of x's shape) overwrites x, the row each band still needs from the band above kept aside."""
    mean, var = _group_statistics(x, norm.num_groups)
    height = x.shape[2]
    halo = conv.kernel_size[0] // 2
    kept: torch.Tensor | None = None  # in place: the previous band's last input rows, before it overwrote them

    def band(r0: int, r1: int) -> torch.Tensor:
        nonlocal kept
        lo, hi = max(r0 - halo, 0), min(r1 + halo, height)
        rows = x[:, :, lo:hi] if kept is None else torch.cat([kept, x[:, :, r0:hi]], dim=2)
        if in_place and halo:
            kept = x[:, :, r1 - halo : r1].clone()
        # the module pads every side by one: the rows it computes from that padding inside the image are dropped
        return conv(_norm_swish(rows, norm, mean, var))[:, :, r0 - lo : r0 - lo + r1 - r0]

    return _assemble_bands(height, band, x if in_place else None)


def _assemble_bands(
    height: int, band: Callable[[int, int], torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    """The tensor whose rows r0:r1 are ``band(r0, r1)``, written into ``out`` (or a new tensor like the bands)."""
    for r0, r1 in _bands(height):
        y = band(r0, r1)
        if out is None:
            out = _empty_like_rows(y, height)
        out[:, :, r0:r1] = y
    assert out is not None
    return out


class TokenConv(nn.Conv2d):
    """A 1x1 convolution (the checkpoint's [C, C, 1, 1] weight) applied to [b, n, C] tokens as a linear layer:
    the same maths, and the same matmul that diffusers' converted attention runs. It stays a module call so
    that forward hooks (sdgen's per-layer offload) see it."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, self.weight.flatten(1), self.bias)


class AttnBlock(nn.Module):
    """LDM's "vanilla" self-attention over all pixels: one head as wide as the channels, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = TokenConv(channels)
        self.k = TokenConv(channels)
        self.v = TokenConv(channels)
        self.proj_out = TokenConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # [b, c, h*w] is a view in both memory formats; normalising it equals normalising x (diffusers' order)
        tokens = self.norm(x.flatten(2)).transpose(1, 2)  # [b, h*w, c]
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.q, self.k, self.v))  # [b, 1 head, h*w, c]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # scaled by c ** -0.5 as in LDM
        out = self.proj_out(out).transpose(1, 2).reshape(b, c, h, w)
        return out + x


class Downsample(nn.Module):
    """Halve the resolution: pad one row and column at the bottom/right (LDM's asymmetric padding), then a
    stride-2 3x3 convolution without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's channels-last nearest kernel fails on large batches and outputs of 2**31 elements and more
        # (pytorch#141831, diffusers#984); the layout does not change the values
        if x.shape[0] >= 64 or x.numel() * 4 >= 2**31:
            x = x.contiguous()
        if not _in_bands(x):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        height = 2 * x.shape[2]

        def band(r0: int, r1: int) -> torch.Tensor:  # output rows r0:r1 from input rows r // 2 (plus the halo)
            lo, hi = max(r0 - 1, 0), min(r1 + 1, height)
            up = F.interpolate(x[:, :, lo // 2 : (hi + 1) // 2], scale_factor=2.0, mode="nearest")
            return self.conv(up[:, :, lo % 2 : lo % 2 + hi - lo])[:, :, r0 - lo : r0 - lo + r1 - r0]

        return _assemble_bands(height, band)


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, each followed by attention where the yaml's
    ``attn_resolutions`` names this resolution (never in SD's VAEs), then the resampling if any."""

    def __init__(self, cin: int, cout: int, count: int, attention: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout) for i in range(count))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(count if attention else 0))

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class DownLevel(Level):
    def __init__(self, cin: int, cout: int, count: int, attention: bool, downsample: bool) -> None:
        super().__init__(cin, cout, count, attention)
        self.downsample = Downsample(cout) if downsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.run_blocks(h)
        return self.downsample(h) if self.downsample is not None else h


class UpLevel(Level):
    def __init__(self, cin: int, cout: int, count: int, attention: bool, upsample: bool) -> None:
        super().__init__(cin, cout, count, attention)
        self.upsample = Upsample(cout) if upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.run_blocks(h)
        return self.upsample(h) if self.upsample is not None else h


class Mid(nn.Module):
    """The lowest resolution's res block, attention, res block (attention always, whatever the yaml says)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _has_attention(dd: dict[str, Any], level: int) -> bool:
    return dd.get("resolution", 256) // 2**level in dd.get("attn_resolutions", [])


class Encoder(nn.Module):
    """Pixels [b, in_channels, H, W] -> posterior moments [b, 2 * z_channels, H / f, W / f]."""

    def __init__(self, dd: dict[str, Any]) -> None:
        super().__init__()
        ch, mults, n = dd["ch"], list(dd["ch_mult"]), len(dd["ch_mult"])
        self.conv_in = nn.Conv2d(dd["in_channels"], ch, 3, padding=1)
        widths = [ch] + [ch * m for m in mults]  # level i goes from widths[i] to widths[i + 1] channels
        self.down = nn.ModuleList(
            DownLevel(widths[i], widths[i + 1], dd["num_res_blocks"], _has_attention(dd, i), downsample=i != n - 1)
            for i in range(n)
        )
        self.mid = Mid(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * dd["z_channels"], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h)), inplace=True))


class Decoder(nn.Module):
    """Latents [b, z_channels, h, w] -> pixels [b, out_ch, h * f, w * f]. As in LDM, ``up[i]`` is the level
    at resolution / 2**i (LDM builds the list from the lowest resolution, inserting each level in front), so it
    runs from ``up[-1]`` to ``up[0]``; each level has one res block more than the encoder's."""

    def __init__(self, dd: dict[str, Any]) -> None:
        super().__init__()
        ch, mults, n = dd["ch"], list(dd["ch_mult"]), len(dd["ch_mult"])
        widths = [ch * m for m in mults]
        self.conv_in = nn.Conv2d(dd["z_channels"], widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        fed_by = widths[1:] + widths[-1:]  # level i takes level i + 1's output (half its resolution); the last, mid's
        self.up = nn.ModuleList(
            UpLevel(fed_by[i], widths[i], dd["num_res_blocks"] + 1, _has_attention(dd, i), upsample=i != 0)
            for i in range(n)
        )
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], dd["out_ch"], 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        if _in_bands(h):
            return norm_swish_conv_in_bands(h, self.norm_out, self.conv_out)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


@dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior: per latent a normal distribution (the caller samples it with its own noise)."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(*LOGVAR_RANGE))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)


class EncoderOutput(NamedTuple):
    latent_dist: DiagonalGaussian


class AutoencoderKL(nn.Module):
    """LDM's ``AutoencoderKL`` for inference, with diffusers' calling convention where sdgen uses it.

    ``ddconfig`` is the yaml's ``first_stage_config.params.ddconfig``; ``scale_factor`` is the model's latent
    scale (``model.params.scale_factor``), which the caller applies (it is only recorded here).
    """

    def __init__(self, ddconfig: dict[str, Any], embed_dim: int, scale_factor: float) -> None:
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ConfigError("first_stage_config: a KL autoencoder needs double_z: True (mean and log-variance)")
        z = ddconfig["z_channels"]
        self.encoder = Encoder(ddconfig)
        self.decoder = Decoder(ddconfig)
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.config = types.SimpleNamespace(
            block_out_channels=[ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
            scaling_factor=scale_factor,
            latent_channels=z,
            sample_size=ddconfig.get("resolution", 256),
        )
        self.factor = 2 ** (len(ddconfig["ch_mult"]) - 1)  # pixels per latent, each way
        self.use_slicing = False
        self.use_tiling = False
        self.tile_latents = TILE_LATENTS
        self.tile_overlap = TILE_OVERLAP

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    # ---- memory-saving modes (sdgen's out-of-memory fallback) ----------------------------------------
    def enable_slicing(self) -> None:
        """Encode and decode one batch item at a time: the same pixels, a lower peak."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_latents: int = TILE_LATENTS, overlap: float = TILE_OVERLAP) -> None:
        """Encode and decode inputs wider or taller than ``tile_latents`` latents in overlapping tiles, blended
        linearly across the overlap: the peak memory is that of one tile. The pixels differ a little from an
        untiled run (the convolutions near a tile's edge and the mid attention see only the tile)."""
        if tile_latents < 1 or not 0.0 <= overlap < 1.0:
            raise ValueError(f"tile of {tile_latents} latents with overlap {overlap}: need >= 1 and [0, 1)")
        self.use_tiling, self.tile_latents, self.tile_overlap = True, tile_latents, overlap

    def disable_tiling(self) -> None:
        self.use_tiling = False

    # ---- encode / decode -----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> EncoderOutput:
        """Pixels in [-1, 1] -> the posterior over (unscaled) latents, as ``.latent_dist`` or ``[0]``."""
        moments = self._per_item(self._encode, x.to(self.dtype))
        return EncoderOutput(DiagonalGaussian.from_moments(moments))

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        """Unscaled latents -> ``(pixels,)``, pixels in about [-1, 1] (not clamped), in the VAE's dtype.
        Always a tuple: ``return_dict`` is accepted for diffusers' calling convention only."""
        return (self._per_item(self._decode, z.to(self.dtype)),)

    def _per_item(self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([run(item) for item in x.split(1)])
        return run(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self._tiles(x, self.factor):
            return _tiled(lambda t: self.quant_conv(self.encoder(t)), x, *self._tiling(), self.factor, 1)
        return self.quant_conv(self.encoder(x))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self._tiles(z, 1):
            return _tiled(lambda t: self.decoder(self.post_quant_conv(t)), z, *self._tiling(), 1, self.factor)
        return self.decoder(self.post_quant_conv(z))

    def _tiles(self, x: torch.Tensor, per_latent: int) -> bool:
        """Whether to tile ``x`` (``per_latent`` pixels per latent): when larger than a tile, and only for
        whole latents (sdgen's sizes always are), so that the tiles of input and output line up."""
        h, w = x.shape[-2:]
        whole = h % per_latent == 0 and w % per_latent == 0
        return self.use_tiling and whole and max(h, w) > self.tile_latents * per_latent

    def _tiling(self) -> tuple[int, int]:
        return self.tile_latents, round(self.tile_latents * self.tile_overlap)


# ---- tiling -------------------------------------------------------------------------------------------


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest ``tile``-long tiles that cover ``size`` with at least ``overlap`` between
    neighbours, spread evenly (so no sliver of a tile at the end)."""
    if size <= tile:
        return [0]
    stride = max(tile - overlap, 1)
    count = -(-(size - tile) // stride) + 1  # ceil
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _axis_weights(starts: Sequence[int], tile: int, scale: int, size: int) -> list[torch.Tensor]:
    """Per tile, its blending weight along one axis in output units (``scale`` per latent): 1 inside, a
    linear ramp across each overlap with a neighbour; normalised so that the tiles' weights sum to 1."""
    weights, total = [], torch.zeros(size * scale)
    for i, start in enumerate(starts):
        w = torch.ones(tile * scale)
        if i > 0:  # ramp up across the overlap with the previous tile
            n = (starts[i - 1] + tile - start) * scale
            w[:n] = torch.minimum(w[:n], (torch.arange(n) + 0.5) / n)
        if i < len(starts) - 1:  # ramp down across the overlap with the next one
            n = (start + tile - starts[i + 1]) * scale
            w[tile * scale - n :] = torch.minimum(w[tile * scale - n :], (n - 0.5 - torch.arange(n)) / n)
        weights.append(w)
        total[start * scale : (start + tile) * scale] += w
    return [w / total[s * scale : (s + tile) * scale] for w, s in zip(weights, starts, strict=True)]


def _tiled(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, scale_in: int, scale_out: int
) -> torch.Tensor:
    """``run`` (which maps ``scale_in`` input pixels per latent to ``scale_out``) over overlapping tiles of
    ``tile`` latents, the outputs blended. Tile positions are whole latents, so input and output align."""
    h, w = x.shape[-2] // scale_in, x.shape[-1] // scale_in  # in latents
    th, tw = min(tile, h), min(tile, w)
    ys, xs = _tile_starts(h, th, overlap), _tile_starts(w, tw, overlap)
    wy, wx = _axis_weights(ys, th, scale_out, h), _axis_weights(xs, tw, scale_out, w)
    out: torch.Tensor | None = None
    for y, weight_y in zip(ys, wy, strict=True):
        for x0, weight_x in zip(xs, wx, strict=True):
            piece = run(x[..., y * scale_in : (y + th) * scale_in, x0 * scale_in : (x0 + tw) * scale_in])
            if out is None:  # float32: the blended sum of half-precision tiles would round at every add
                out = piece.new_zeros((*piece.shape[:2], h * scale_out, w * scale_out), dtype=torch.float32)
            weight = (weight_y[:, None] * weight_x[None, :]).to(piece.device)
            out[..., y * scale_out : (y + th) * scale_out, x0 * scale_out : (x0 + tw) * scale_out] += piece * weight
    assert out is not None
    return out.to(x.dtype)
