"""What a model family is: everything that differs between SD 1.x, SD 2.x, the x4 upscaler and the families
to come, in one class each (ComfyUI's supported_models.py does the same). Nothing else in sdgen tests a
family by name; detection walks the registry in :mod:`sdgen.families`.

Importing a family imports no torch: the CLI reads the defaults for its help text from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

UNET_PREFIX = "model.diffusion_model."
UNET_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."


@dataclass(frozen=True)
class TextEncoder:
    """The text encoder's layout and the tokenizer's conventions that go with it."""

    layout: str  # "clip": HF CLIP under cond_stage_model.transformer; "openclip": open_clip's text tower
    target: str  # the yaml's cond_stage_config target, as the reference names it
    pad_id: int  # SD 1.x pads with <|endoftext|> (HF CLIPTokenizer); open_clip.tokenize pads with 0
    unescape_html: bool  # open_clip's clean-up unescapes HTML entities; the HF CLIP one does not
    hidden_act: str  # CLIP ViT-L/14 uses quick_gelu, OpenCLIP ViT-H/14 gelu


CLIP = TextEncoder("clip", "ldm.modules.encoders.modules.FrozenCLIPEmbedder", 49407, False, "quick_gelu")
OPENCLIP = TextEncoder("openclip", "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", 0, True, "gelu")


class Family:
    """One model family. Subclasses set the class attributes and may override the decisions."""

    name: ClassVar[str]  # short id written into metadata: "sd1"
    label: ClassVar[str]  # what users read: "SD 1.x"
    modes: ClassVar[tuple[str, ...]]  # the generation modes (CLI commands) this family serves
    unet_in_channels: ClassVar[int]  # latents plus any concatenated image channels
    text: ClassVar[TextEncoder]
    configs: ClassVar[dict[bool, str]]  # v-prediction? -> the shipped original yaml
    watermark: ClassVar[bytes]  # the reference scripts' invisible watermark payload
    default_scale: ClassVar[dict[str, float]]  # mode -> the reference scripts' guidance default
    vae_fp32: ClassVar[bool] = False  # the VAE overflows in fp16: keep it in fp32 on every device
    upcast_attention: ClassVar[bool] = False  # attention scores in fp32 (the reference's ATTN_PRECISION)

    def matches(self, state_dict: dict[str, Any]) -> bool:
        """Whether an original-layout state dict holds this family (UNet input channels + text encoder)."""
        if UNET_IN_KEY not in state_dict or state_dict[UNET_IN_KEY].shape[1] != self.unet_in_channels:
            return False
        prefix = CLIP_PREFIX if self.text.layout == "clip" else OPENCLIP_PREFIX
        return any(k.startswith(prefix) for k in state_dict)

    def matches_diffusers(self, unet_in_channels: int, text_hidden_act: str) -> bool:
        """The same decision for a diffusers folder, from its UNet and text encoder configs."""
        return unet_in_channels == self.unet_in_channels and text_hidden_act == self.text.hidden_act

    def decide_v_prediction(
        self, state_dict: dict[str, Any], ckpt_name: str, flag: bool | None, config: dict | None
    ) -> bool:
        """Epsilon unless told otherwise (the flag or the yaml's parameterization)."""
        if flag is not None:
            return flag
        if config is not None:
            return config["model"]["params"].get("parameterization", "eps") == "v"
        return False

    def native_size(self, v_prediction: bool) -> int:
        """The training resolution in pixels: the default -H/-W."""
        return 512

    def __repr__(self) -> str:
        return f"<family {self.name}>"
