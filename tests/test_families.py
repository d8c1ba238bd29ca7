"""Family and v-prediction decisions, and the shipped configs."""

from __future__ import annotations

import torch

from sdgen.families import SD1, SD2, V_PREDICTION_PROBE_KEY, X4, decide_v_prediction, shipped_config


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
