"""Stable Diffusion 2.x at 512 (epsilon) and 768 (v-prediction)."""

from __future__ import annotations

import re
from typing import Any

from sdgen.families.base import OPENCLIP, UNET_PREFIX, Family

# In SD 2.x-v checkpoints this LayerNorm's bias has a clearly larger spread than in the epsilon ones;
# ComfyUI's model detection uses the same observation. Present only in full-size checkpoints.
V_PREDICTION_PROBE_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PREDICTION_PROBE_STD = 0.09


class SD2(Family):
    name = "sd2"
    label = "SD 2.x"
    modes = ("txt2img", "img2img")
    unet_in_channels = 4
    text = OPENCLIP  # the penultimate layer of OpenCLIP ViT-H/14, then ln_final
    configs = {False: "v2-inference.yaml", True: "v2-inference-v.yaml"}
    watermark = b"SDV2"
    default_scale = {"txt2img": 9.0, "img2img": 9.0}  # the SD 2 scripts
    upcast_attention = True

    def decide_v_prediction(
        self, state_dict: dict[str, Any], ckpt_name: str, flag: bool | None, config: dict | None
    ) -> bool:
        """The flag wins, then the yaml, then a '768' in the file name (how SD 2.x-v files are named),
        then the weight-statistics probe, else epsilon."""
        if flag is not None or config is not None:
            return super().decide_v_prediction(state_dict, ckpt_name, flag, config)
        if re.search(r"768", ckpt_name):
            return True
        probe = state_dict.get(V_PREDICTION_PROBE_KEY)
        if probe is not None:
            return float(probe.float().std(unbiased=False)) > V_PREDICTION_PROBE_STD
        return False

    def native_size(self, v_prediction: bool) -> int:
        return 768 if v_prediction else 512
