"""The original LDM inference yaml that describes a single-file checkpoint: the user's ``--config``, a
``NAME.yaml`` beside ``NAME.ckpt``, or the one sdgen ships for the detected family."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sdgen.errors import ConfigError, InputError
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
        text = read_regular_file(path, "--config", MAX_YAML_BYTES).decode("utf-8")
    except InputError as e:
        raise ConfigError(str(e)) from None
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
        params["unet_config"]["params"]["model_channels"]
        params["first_stage_config"]["params"]["ddconfig"]["ch_mult"]
        params["cond_stage_config"]["target"]
    except (KeyError, TypeError):
        raise ConfigError(
            f"{source}: not an original LDM inference config (needs model.params.unet_config, "
            "first_stage_config and cond_stage_config, as in v1-inference.yaml)"
        ) from None


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
