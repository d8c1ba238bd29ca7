"""Which kind of model a state dict holds, and the original LDM yaml that describes it.

Family is read from key names and shapes: the UNet's input channels (4 = txt2img, 7 = x4 upscaler) and the
text encoder's layout (HF CLIP under ``cond_stage_model.transformer`` = SD 1.x, OpenCLIP under
``cond_stage_model.model`` = SD 2.x). SD 2.x epsilon vs v-prediction is not in the weights' layout; see
:func:`decide_v_prediction`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sdgen.errors import CheckpointError, ConfigError

SD1, SD2, X4 = "sd1", "sd2", "x4"
FAMILY_NAMES = {SD1: "SD 1.x", SD2: "SD 2.x", X4: "SD x4 upscaler"}
UNET_PREFIX = "model.diffusion_model."
UNET_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
# In SD 2.x-v checkpoints this LayerNorm's bias has a clearly larger spread than in the epsilon ones;
# ComfyUI's model detection uses the same observation. Present only in full-size checkpoints.
V_PREDICTION_PROBE_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"

SHIPPED_CONFIGS = {
    (SD1, False): "v1-inference.yaml",
    (SD2, False): "v2-inference.yaml",
    (SD2, True): "v2-inference-v.yaml",
    (X4, True): "x4-upscaling.yaml",
}
TEXT_ENCODER_TARGETS = {
    SD1: "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    SD2: "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
    X4: "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
}


@dataclass(frozen=True)
class ModelSpec:
    """What was decided about a checkpoint before any model is built."""

    family: str
    config: dict[str, Any]  # the parsed original LDM yaml
    config_source: str  # the user's --config path, or the shipped file's name
    v_prediction: bool
    native_size: int  # pixels; the default -H/-W

    @property
    def params(self) -> dict[str, Any]:
        return self.config["model"]["params"]


def detect_family(state_dict: dict[str, Any], source: str) -> str:
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        raise CheckpointError(f"{source}: an SDXL checkpoint; sdgen supports SD 1.x, SD 2.x and the x4 upscaler")
    if UNET_IN_KEY not in state_dict:
        raise CheckpointError(
            f"{source}: not a Stable Diffusion checkpoint (no UNet weights under '{UNET_PREFIX}')"
        )
    in_channels = state_dict[UNET_IN_KEY].shape[1]
    has_clip = any(k.startswith(CLIP_PREFIX) for k in state_dict)
    has_openclip = any(k.startswith(OPENCLIP_PREFIX) for k in state_dict)
    if in_channels == 4 and has_clip:
        return SD1
    if in_channels == 4 and has_openclip:
        return SD2
    if in_channels == 7 and has_openclip:
        return X4
    kinds = {9: "an inpainting", 5: "a depth-to-image"}
    what = kinds.get(in_channels, f"an unknown ({in_channels}-channel UNet)")
    raise CheckpointError(f"{source}: {what} checkpoint; sdgen supports SD 1.x, SD 2.x and the x4 upscaler")


def decide_v_prediction(
    family: str, state_dict: dict[str, Any], ckpt_name: str, flag: bool | None, config: dict | None
) -> bool:
    """SD 2.x: v-prediction or epsilon. The flag wins, then the yaml, then a '768' in the file name
    (how SD 2.x-v files are named), then the weight-statistics probe, else epsilon."""
    if family == X4:
        return True
    if family == SD1:
        return bool(flag)
    if flag is not None:
        return flag
    if config is not None:
        return config["model"]["params"].get("parameterization", "eps") == "v"
    if re.search(r"768", ckpt_name):
        return True
    probe = state_dict.get(V_PREDICTION_PROBE_KEY)
    if probe is not None:
        return float(probe.float().std(unbiased=False)) > 0.09
    return False


def load_yaml(path: Path) -> dict[str, Any]:
    """Parse an original LDM inference yaml given with --config; check the parts sdgen reads."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
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


def shipped_config(family: str, v_prediction: bool) -> tuple[dict[str, Any], str]:
    name = SHIPPED_CONFIGS[(family, v_prediction)]
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


def resolve_spec(
    state_dict: dict[str, Any], ckpt: Path, config_path: Path | None, v_prediction: bool | None
) -> ModelSpec:
    family = detect_family(state_dict, str(ckpt))
    user_config = load_yaml(config_path) if config_path else None
    v = decide_v_prediction(family, state_dict, ckpt.name, v_prediction, user_config)
    if user_config is not None:
        config, source = user_config, str(config_path)
        target = config["model"]["params"]["cond_stage_config"]["target"]
        if target != TEXT_ENCODER_TARGETS[family]:
            raise ConfigError(
                f"--config {config_path} does not match {ckpt}: the yaml's text encoder is {target}, "
                f"the checkpoint is {FAMILY_NAMES[family]}"
            )
    else:
        config, source = shipped_config(family, v)
    native = 768 if (family == SD2 and v) else 512
    return ModelSpec(family=family, config=config, config_source=source, v_prediction=v, native_size=native)
