"""The original LDM inference yaml that describes a single-file checkpoint: the user's ``--config``, a
``NAME.yaml`` beside ``NAME.ckpt``, or the one sdgen ships for the detected family."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sdgen.errors import ConfigError
from sdgen.families import Family, detect
from sdgen.input_files import read_regular_file


@dataclass(frozen=True)
class Architecture:
    """What was decided about a checkpoint before any module is built."""

    family: Family
    config: dict[str, Any]  # the parsed original LDM yaml
    config_source: str  # the user's --config path, or the shipped file's name
    v_prediction: bool
    native_size: int  # pixels; the default -H/-W

    @property
    def params(self) -> dict[str, Any]:
        return self.config["model"]["params"]


MAX_YAML_BYTES = 1 << 20  # the original inference yamls are 2-3 KB


def load_yaml(path: Path) -> dict[str, Any]:
    """Parse an original LDM inference yaml given with --config; check the parts sdgen reads."""
    try:
        text = read_regular_file(path, "--config", MAX_YAML_BYTES, ConfigError).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot be read ({e})") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{line}") from None
    _check_schema(config, f"--config {path}")
    return config


def shipped_config(family: Family, v_prediction: bool) -> tuple[dict[str, Any], str]:
    name = family.configs[v_prediction]
    text = resources.files("sdgen.configs").joinpath(name).read_text(encoding="utf-8")
    return yaml.safe_load(text), name


def _check_schema(config: Any, source: str) -> None:
    try:
        params = config["model"]["params"]
        unet = params["unet_config"]["params"]
        unet["model_channels"]
        first = params["first_stage_config"]["params"]
        first["ddconfig"]["ch_mult"]
        params["cond_stage_config"]["target"]
    except (KeyError, TypeError):
        raise ConfigError(
            f"{source}: not an original LDM inference config (needs model.params.unet_config, "
            "first_stage_config and cond_stage_config, as in v1-inference.yaml)"
        ) from None
    _check_values(params, "model.params", MODEL_FIELDS, source)
    _check_values(unet, "model.params.unet_config.params", UNET_FIELDS, source)
    _check_values(first, "model.params.first_stage_config.params", {"embed_dim": CHANNELS}, source)
    _check_values(first["ddconfig"], "model.params.first_stage_config.params.ddconfig", VAE_FIELDS, source)
    levels = len(unet["channel_mult"])
    for name in ("transformer_depth", "disable_self_attentions"):
        value = unet.get(name)
        if isinstance(value, list) and len(value) != levels:
            raise ConfigError(f"{source}: unet_config {name} has {len(value)} entries; channel_mult has {levels}")


# What sdgen reads from a yaml, with the bounds that keep a typo from allocating gigabytes: (kind, low, high).
# kind: int, float, bool, ints (a non-empty list of ints), ints? (a list, may be empty), int|ints, bools.
Bound = tuple[str, float, float]
CHANNELS: Bound = ("int", 1, 64)
MODEL_FIELDS: dict[str, Bound] = {
    "timesteps": ("int", 1, 100_000),
    "linear_start": ("float", 1e-8, 0.999),
    "linear_end": ("float", 1e-8, 0.999),
    "scale_factor": ("float", 1e-6, 1e3),
}
UNET_FIELDS: dict[str, Bound] = {
    "model_channels": ("int", 32, 4096),
    "channel_mult": ("ints", 1, 16),
    "num_res_blocks": ("int", 1, 16),
    "attention_resolutions": ("ints?", 1, 64),
    "transformer_depth": ("int|ints", 1, 64),
    "context_dim": ("int", 1, 16384),
    "in_channels": CHANNELS,
    "out_channels": CHANNELS,
    "num_heads": ("int", -1, 256),
    "num_head_channels": ("int", -1, 1024),
    "num_classes": ("int", 1, 100_000),
    "image_size": ("int", 1, 4096),
    "disable_self_attentions": ("bools", 0, 0),
}
VAE_FIELDS: dict[str, Bound] = {
    "ch": ("int", 32, 1024),
    "ch_mult": ("ints", 1, 16),
    "num_res_blocks": ("int", 1, 16),
    "z_channels": CHANNELS,
    "in_channels": CHANNELS,
    "out_ch": CHANNELS,
    "resolution": ("int", 1, 65536),
    "attn_resolutions": ("ints?", 1, 65536),
    "double_z": ("bool", 0, 0),
}
MAX_LEVELS = 8


def _check_values(section: Any, where: str, fields: dict[str, Bound], source: str) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, not {type(section).__name__}")
    for name, (kind, low, high) in fields.items():
        if name not in section or section[name] is None:
            continue
        value = section[name]
        if not _fits(value, kind, low, high):
            allowed = {
                "int": f"an integer from {low:g} to {high:g}",
                "float": f"a number from {low:g} to {high:g}",
                "bool": "true or false",
                "ints": f"a list of 1 to {MAX_LEVELS} integers from {low:g} to {high:g}",
                "ints?": f"a list of integers from {low:g} to {high:g}",
                "int|ints": f"an integer from {low:g} to {high:g}, or a list of them",
                "bools": "a list of true/false",
            }[kind]
            raise ConfigError(f"{source}: {where}.{name} is {value!r:.60}; it must be {allowed}")


def _fits(value: Any, kind: str, low: float, high: float) -> bool:
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    if kind == "int":
        return integer(value)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "bools":
        return isinstance(value, list) and len(value) <= MAX_LEVELS and all(isinstance(v, bool) for v in value)
    if kind == "int|ints" and integer(value):
        return True
    empty_ok = kind == "ints?"
    return (
        isinstance(value, list)
        and (empty_ok or 1 <= len(value) <= MAX_LEVELS)
        and len(value) <= 64
        and all(integer(v) for v in value)
    )


def resolve(
    state_dict: dict[str, Any], ckpt: Path, config_path: Path | None, v_prediction: bool | None
) -> Architecture:
    family = detect(state_dict, str(ckpt))
    user_config = load_yaml(config_path) if config_path else None
    v = family.decide_v_prediction(state_dict, ckpt.name, v_prediction, user_config)
    if user_config is not None:
        config, source = user_config, str(config_path)
        target = config["model"]["params"]["cond_stage_config"]["target"]
        if target != family.text.target:
            raise ConfigError(
                f"--config {config_path} does not match {ckpt}: the yaml's text encoder is {target}, "
                f"the checkpoint is {family.label}"
            )
    else:
        config, source = shipped_config(family, v)
    return Architecture(
        family=family, config=config, config_source=source, v_prediction=v, native_size=family.native_size(v)
    )
