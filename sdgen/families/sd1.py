"""Stable Diffusion 1.x (CompVis v1-1 .. v1-4, RunwayML v1-5 and their fine-tunes)."""

from __future__ import annotations

from sdgen.families.base import CLIP, Family


class SD1(Family):
    name = "sd1"
    label = "SD 1.x"
    modes = ("txt2img", "img2img")
    unet_in_channels = 4
    text = CLIP  # the last hidden state of CLIP ViT-L/14
    configs = {False: "v1-inference.yaml", True: "v1-inference.yaml"}  # v only with the flag (rare fine-tunes)
    watermark = b"StableDiffusionV1"
    default_scale = {"txt2img": 7.5, "img2img": 5.0}  # scripts/txt2img.py and scripts/img2img.py
