"""The CLIP text transformer of SD 1.x (OpenAI CLIP ViT-L/14) and SD 2.x / the x4 upscaler (OpenCLIP ViT-H/14).

Both are the same pre-norm causal transformer; they differ in size, activation and how the checkpoint stores
them. SD 1.x checkpoints hold a transformers ``CLIPTextModel`` under ``cond_stage_model.transformer.``; SD 2.x
ones hold open_clip's text tower under ``cond_stage_model.model.``, with q, k and v stacked in one
``in_proj_weight``. The parameter names here are the HF ones without ``text_model.``, so the HF layout maps
one to one and the open_clip one through :func:`openclip_key_map`.

The key maps work from key names alone and say, for each parameter, which checkpoint tensor to take and
which third of it (q, k, v): a loader can apply them to lazily read tensors, and nothing is computed on
tensor data but views. The numerics are those of transformers' ``CLIPTextModel`` with SDPA attention.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sdgen.errors import ConfigError
from sdgen.families.base import CLIP_PREFIX, OPENCLIP_PREFIX
from sdgen.nets import Embedding

HEAD_WIDTH = 64  # CLIP ViT-L/14 and OpenCLIP ViT-H/14 both use 64-wide heads
LAYER_NORM_EPS = 1e-5
ACTIVATION = {"clip": "quick_gelu", "openclip": "gelu"}  # by checkpoint layout (as the families' hidden_act)
LAYERS = ("last", "penultimate")  # FrozenOpenCLIPEmbedder's choices: the output of which resblock is used

# (index, count): the index-th of ``count`` equal parts of a tensor's first dimension (q, k, v of in_proj)
Chunk = tuple[int, int]
# our parameter name -> (the checkpoint key it is read from, the part of that tensor or None for all of it)
KeyMap = dict[str, tuple[str, Chunk | None]]


class TextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [batch, tokens, width], after the final layer norm


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # [b, n, width] -> [b, heads, n, head width]
            return t.view(b, n, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        # causal: each token attends to itself and the ones before it (the default scale is head width ** -0.5)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, activation: str) -> None:
        super().__init__()
        if activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"unknown activation {activation!r}: quick_gelu or gelu")
        self.activation = activation
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        # quick_gelu is the sigmoid approximation OpenAI's CLIP was trained with; OpenCLIP ViT-H uses exact gelu
        x = x * torch.sigmoid(1.702 * x) if self.activation == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, activation: str) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.self_attn = Attention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = MLP(width, mlp_width, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, vocab_size: int, width: int, positions: int) -> None:
        super().__init__()
        self.token_embedding = Embedding(vocab_size, width)
        self.position_embedding = Embedding(positions, width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # position ids are made here, not kept as a buffer: nothing to rebuild after a meta-device construction
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class Encoder(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, mlp_width: int, activation: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(width, heads, mlp_width, activation) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TextTransformer(nn.Module):
    """Token ids [batch, tokens] -> hidden states [batch, tokens, width] (``.last_hidden_state``)."""

    def __init__(
        self, vocab_size: int, width: int, layers: int, heads: int, mlp_width: int, positions: int, activation: str
    ) -> None:
        super().__init__()
        # what sdgen reads from a text encoder's config (the family check of diffusers folders reads hidden_act)
        self.config = types.SimpleNamespace(hidden_act=activation, hidden_size=width, num_hidden_layers=layers)
        self.embeddings = Embeddings(vocab_size, width, positions)
        self.encoder = Encoder(layers, width, heads, mlp_width, activation)
        self.final_layer_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer_norm.weight.dtype

    def forward(self, input_ids: torch.Tensor) -> TextOutput:
        x = self.encoder(self.embeddings(input_ids))
        return TextOutput(last_hidden_state=self.final_layer_norm(x))


# ---- checkpoint keys ---------------------------------------------------------------------------------


def clip_key_map(keys: Iterable[str]) -> KeyMap:
    """The HF layout under ``cond_stage_model.transformer.``: the same names without ``text_model.``."""
    out: KeyMap = {}
    for key in keys:
        if not key.startswith(CLIP_PREFIX):
            continue
        # checkpoints saved with transformers < 4.17 lack the text_model. part
        name = key[len(CLIP_PREFIX) :].removeprefix("text_model.")
        if not name.endswith("position_ids"):  # a buffer, sometimes stored corrupted (as floats): made in forward
            out[name] = (key, None)
    return out


_OPENCLIP_NAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",  # a bare [positions, width] tensor
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def openclip_key_map(keys: Iterable[str], layer: str) -> KeyMap:
    """open_clip's text tower under ``cond_stage_model.model.``. With layer "penultimate" (SD 2.x) the last
    resblock is left out: its input, through ln_final, is the conditioning. text_projection and logit_scale
    are dropped (sdgen uses the hidden states, never the pooled projection), as is anything else unknown."""
    if layer not in LAYERS:
        raise ConfigError(f"the OpenCLIP text encoder's layer is {layer!r}; sdgen knows {' and '.join(LAYERS)}")
    names = [k[len(OPENCLIP_PREFIX) :] for k in keys if k.startswith(OPENCLIP_PREFIX)]
    blocks = [(int(m[1]), m[2], name) for name in names if (m := _RESBLOCK.fullmatch(name))]
    total = max((i for i, _, _ in blocks), default=-1) + 1
    used = total - 1 if layer == "penultimate" else total
    if used < 1:
        raise ConfigError(f"the OpenCLIP text encoder has {total} layers; layer={layer!r} needs more")
    out: KeyMap = {}
    for name in names:
        if name in _OPENCLIP_NAMES:
            out[_OPENCLIP_NAMES[name]] = (OPENCLIP_PREFIX + name, None)
    for i, rest, name in blocks:
        if i >= used:
            continue
        key, ours = OPENCLIP_PREFIX + name, f"encoder.layers.{i}."
        module, _, kind = rest.rpartition(".")
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.removeprefix("attn.in_proj_")
            for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # stacked in this order along dim 0
                out[f"{ours}self_attn.{proj}.{kind}"] = (key, (part, 3))
        elif module in _OPENCLIP_BLOCK:
            out[f"{ours}{_OPENCLIP_BLOCK[module]}.{kind}"] = (key, None)
    return out


def text_key_map(keys: Iterable[str], layout: str, layer: str = "last") -> KeyMap:
    """The key map of a checkpoint's text encoder by the family's layout ("clip" or "openclip"); layer only
    applies to open_clip (FrozenCLIPEmbedder's SD 1.x yamls use the last layer)."""
    if layout == "clip":
        return clip_key_map(keys)
    if layout == "openclip":
        return openclip_key_map(keys, layer)
    raise ValueError(f"unknown text encoder layout {layout!r}: clip or openclip")


def chunk_slice(chunk: Chunk, length: int) -> slice:
    """The rows of a first dimension of ``length`` that ``chunk`` names."""
    index, count = chunk
    size = length // count
    return slice(index * size, (index + 1) * size)


def apply_key_map(sd: Mapping[str, torch.Tensor], key_map: KeyMap) -> dict[str, torch.Tensor]:
    """Our parameters from a checkpoint's tensors: the same tensors, or views of their rows (no copies)."""
    out = {}
    for name, (key, chunk) in key_map.items():
        value = sd[key]
        out[name] = value if chunk is None else value[chunk_slice(chunk, value.shape[0])]
    return out


def mapped_shapes(shapes: Mapping[str, Sequence[int]], key_map: KeyMap) -> dict[str, tuple[int, ...]]:
    """Our parameters' shapes from the checkpoint's, without any tensor data."""
    out = {}
    for name, (key, chunk) in key_map.items():
        shape = tuple(shapes[key])
        if chunk is not None:
            shape = (len(range(shape[0])[chunk_slice(chunk, shape[0])]), *shape[1:])
        out[name] = shape
    return out


def clip_weights(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return apply_key_map(sd, clip_key_map(sd))


def openclip_weights(sd: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
    return apply_key_map(sd, openclip_key_map(sd, layer))


def text_config(keys_and_shapes: Mapping[str, Sequence[int]], layout: str, layer: str = "last") -> dict[str, Any]:
    """:class:`TextTransformer`'s constructor arguments from a checkpoint's key names and shapes (full names,
    with the ``cond_stage_model.`` prefix). ``layers`` counts the layers used (one fewer for penultimate)."""
    shapes = mapped_shapes(keys_and_shapes, text_key_map(keys_and_shapes, layout, layer))

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise ConfigError(f"the checkpoint's {layout} text encoder has no {name} weight (or no text encoder)")
        return shapes[name]

    vocab_size, width = shape("embeddings.token_embedding.weight")
    layers = len({name.split(".")[2] for name in shapes if name.startswith("encoder.layers.")})
    return {
        "vocab_size": vocab_size,
        "width": width,
        "layers": layers,
        "heads": width // HEAD_WIDTH,
        "mlp_width": shape("encoder.layers.0.mlp.fc1.weight")[0],
        "positions": shape("embeddings.position_embedding.weight")[0],
        "activation": ACTIVATION[layout],
    }
