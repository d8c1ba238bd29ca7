"""The model families sdgen knows, and how a checkpoint is matched to one of them.

Adding a family is adding a file here with a :class:`Family` subclass and putting it in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

from sdgen.errors import CheckpointError
from sdgen.families.base import UNET_IN_KEY, UNET_PREFIX, Family
from sdgen.families.sd1 import SD1
from sdgen.families.sd2 import SD2
from sdgen.families.x4 import X4

FAMILIES: tuple[Family, ...] = (SD1(), SD2(), X4())
BY_NAME = {f.name: f for f in FAMILIES}
# Recognised but not (yet) supported, by the UNet's input channels: named in the error message.
UNSUPPORTED_CHANNELS = {9: "an inpainting", 5: "a depth-to-image"}


def supported() -> str:
    return ", ".join(f.label for f in FAMILIES[:-1]) + " and " + FAMILIES[-1].label


def family_named(name: str) -> Family:
    return BY_NAME[name]


def for_mode(mode: str) -> tuple[Family, ...]:
    return tuple(f for f in FAMILIES if mode in f.modes)


def detect(state_dict: dict[str, Any], source: str) -> Family:
    """The family of an original-layout state dict, or a CheckpointError naming what it is instead."""
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        raise CheckpointError(f"{source}: an SDXL checkpoint; sdgen supports {supported()}")
    if UNET_IN_KEY not in state_dict:
        raise CheckpointError(f"{source}: not a Stable Diffusion checkpoint (no UNet weights under '{UNET_PREFIX}')")
    for family in FAMILIES:
        if family.matches(state_dict):
            return family
    in_channels = state_dict[UNET_IN_KEY].shape[1]
    what = UNSUPPORTED_CHANNELS.get(in_channels, f"an unknown ({in_channels}-channel UNet)")
    raise CheckpointError(f"{source}: {what} checkpoint; sdgen supports {supported()}")


def detect_diffusers(unet_in_channels: int, text_hidden_act: str, source: str) -> Family:
    for family in FAMILIES:
        if family.matches_diffusers(unet_in_channels, text_hidden_act):
            return family
    raise CheckpointError(f"{source}: a {unet_in_channels}-channel UNet; sdgen supports {supported()}")


def default_scale_help(mode: str) -> str:
    """'7.5 for SD 1.x, 9.0 for SD 2.x': the defaults as the help texts state them."""
    return ", ".join(f"{f.default_scale[mode]} for {f.label}" for f in for_mode(mode))
