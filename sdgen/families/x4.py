"""The SD x4 upscaler (x4-upscaler-ema): a v-prediction UNet that sees the latents concatenated with the
noise-augmented low-resolution image, and the noise level as its class label.

The augmentation is the reference's ImageConcatWithNoiseAugmentation: q_sample on its own linear schedule
(the yaml's low_scale_config) at ``noise_level``. Its VAE has factor 4 and overflows in fp16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdgen.families.base import OPENCLIP, Family

if TYPE_CHECKING:
    import torch

DEFAULT_NOISE_LEVEL = 20  # the reference superresolution script's default
MAX_NOISE_LEVEL = 350  # the x4 yaml's max_noise_level
UNET_MULTIPLE = 8  # the x4 UNet downsamples 3 times: inputs are padded to a multiple of 8


class X4(Family):
    name = "x4"
    label = "SD x4 upscaler"
    modes = ("upscale",)
    unet_in_channels = 7  # 4 latent + 3 image channels
    text = OPENCLIP
    configs = {True: "x4-upscaling.yaml", False: "x4-upscaling.yaml"}
    watermark = b"SDV2"
    default_scale = {"upscale": 9.0}  # the reference upscaling script
    vae_fp32 = True
    upcast_attention = True

    def decide_v_prediction(
        self, state_dict: dict[str, Any], ckpt_name: str, flag: bool | None, config: dict | None
    ) -> bool:
        return True  # the only x4 upscaler there is


def augment_low_res(image: torch.Tensor, noise: torch.Tensor, noise_level: int, alphas_cumprod: torch.Tensor):
    """The low-resolution image (in [-1, 1]) noised to ``noise_level`` of its own schedule (q_sample)."""
    import torch

    a = alphas_cumprod.to(image.device)[noise_level]
    return torch.sqrt(a) * image + torch.sqrt(1.0 - a) * noise
