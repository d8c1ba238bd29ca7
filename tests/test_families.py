"""Family and v-prediction decisions, and the shipped configs."""

from __future__ import annotations

import torch

from sdgen.checkpoints.ldm_config import shipped_config
from sdgen.families import FAMILIES, family_named
from sdgen.families.sd2 import V_PREDICTION_PROBE_KEY

SD1, SD2, X4 = (family_named(n) for n in ("sd1", "sd2", "x4"))


def decide_v_prediction(family, state_dict, name, flag, config):
    return family.decide_v_prediction(state_dict, name, flag, config)


def test_sd2_768_in_the_name_means_v_else_epsilon():
    assert decide_v_prediction(SD2, {}, "v2-1_768-ema-pruned.ckpt", None, None) is True
    assert decide_v_prediction(SD2, {}, "v2-1_512-ema-pruned.safetensors", None, None) is False


def test_flag_beats_name_and_yaml():
    yaml_v = {"model": {"params": {"parameterization": "v"}}}
    assert decide_v_prediction(SD2, {}, "v2-1_768.ckpt", False, yaml_v) is False
    assert decide_v_prediction(SD2, {}, "v2-1_512.ckpt", True, None) is True
    assert decide_v_prediction(SD2, {}, "model.ckpt", None, yaml_v) is True


def test_weight_probe_for_full_size_sd2_without_a_hint():
    spread = {V_PREDICTION_PROBE_KEY: torch.linspace(-0.5, 0.5, 320)}
    flat = {V_PREDICTION_PROBE_KEY: torch.zeros(320)}
    assert decide_v_prediction(SD2, spread, "model.safetensors", None, None) is True
    assert decide_v_prediction(SD2, flat, "model.safetensors", None, None) is False


def test_sd1_is_epsilon_and_x4_is_v():
    assert decide_v_prediction(SD1, {}, "sd-v1-768.ckpt", None, None) is False
    assert decide_v_prediction(X4, {}, "x4.ckpt", None, None) is True


def test_shipped_configs_are_the_reference_architectures():
    v1, _ = shipped_config(SD1, False)
    v2v, _ = shipped_config(SD2, True)
    x4, _ = shipped_config(X4, True)
    assert v1["model"]["params"]["unet_config"]["params"]["context_dim"] == 768
    assert v2v["model"]["params"]["parameterization"] == "v"
    assert v2v["model"]["params"]["cond_stage_config"]["params"]["layer"] == "penultimate"
    assert x4["model"]["params"]["unet_config"]["params"]["in_channels"] == 7
    assert x4["model"]["params"]["scale_factor"] == 0.08333


def test_every_family_is_complete_and_detected_from_its_own_layout():
    """Each registered family states everything the rest of sdgen asks of it, and detection finds it."""
    from sdgen.families import detect
    from sdgen.testing.ldm_layout import random_state_dict

    for family in FAMILIES:
        assert family.modes and family.watermark and family.configs and family.label
        assert all(mode in family.default_scale for mode in family.modes)
    for name, family in (("sd1", SD1), ("sd2", SD2), ("sd2v", SD2), ("x4", X4)):
        assert detect(random_state_dict(name), name) is family
