"""Errors a user can cause: one line naming the problem and the flag, exit 1 (2 for usage), no traceback,
no output file."""

from __future__ import annotations

import pytest
import torch
import yaml

from sdgen.checkpoints.files import read_state_dict

SMALL = ("-H", "64", "-W", "64", "--steps", "2")


def assert_one_line_error(run, code: int, *needles: str) -> None:
    assert run.code == code, run
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, run.stderr
    for needle in needles:
        assert needle in run.stderr, (needle, run.stderr)
    assert run.stdout == ""


def no_outputs(tmp_path) -> bool:
    return not list(tmp_path.rglob("*.png"))


def test_missing_checkpoint(sdgen, tmp_path):
    run = sdgen("txt2img", "x", "--ckpt", tmp_path / "nope.ckpt", *SMALL)
    assert_one_line_error(run, 1, "--ckpt", "nope.ckpt", "no such file")
    assert no_outputs(tmp_path)


def test_file_that_is_not_a_checkpoint(sdgen, tmp_path):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("hello, I am a text file")
    assert_one_line_error(sdgen("txt2img", "x", "--ckpt", bad, *SMALL), 1, "notes.ckpt", "not a checkpoint")


def test_empty_file(sdgen, tmp_path):
    bad = tmp_path / "empty.safetensors"
    bad.write_bytes(b"")
    assert_one_line_error(sdgen("txt2img", "x", "--ckpt", bad, *SMALL), 1, "empty.safetensors", "empty")


def test_folder_that_is_not_a_model(sdgen, tmp_path):
    (tmp_path / "folder").mkdir()
    assert_one_line_error(sdgen("txt2img", "x", "--ckpt", tmp_path / "folder", *SMALL), 1, "not a diffusers")


def test_checkpoint_of_unknown_family(sdgen, tmp_path):
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    assert_one_line_error(sdgen("txt2img", "x", "--ckpt", path, *SMALL), 1, "not a Stable Diffusion checkpoint")


def test_inpainting_checkpoint_is_named(sdgen, tmp_path):
    path = tmp_path / "inpaint.safetensors"
    from safetensors.torch import save_file

    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(4),
        },
        str(path),
    )
    assert_one_line_error(sdgen("txt2img", "x", "--ckpt", path, *SMALL), 1, "an inpainting checkpoint")


def test_yaml_of_another_family(sdgen, tiny):
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd2.safetensors"], "--config", tiny["sd1.yaml"], *SMALL)
    assert_one_line_error(run, 1, "does not match", "FrozenCLIPEmbedder")


def test_yaml_of_another_size(sdgen, tiny, tmp_path):
    config = yaml.safe_load(tiny["sd1.yaml"].read_text())
    config["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump(config))
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], "--config", path, *SMALL)
    assert_one_line_error(run, 1, "UNet weights do not match", "yaml")


def test_yaml_that_does_not_parse(sdgen, tiny, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  params: [unclosed\n")
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], "--config", path, *SMALL)
    assert_one_line_error(run, 1, "--config", "not valid YAML")


def test_yaml_that_is_not_an_ldm_config(sdgen, tiny, tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("name: something else\n")
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], "--config", path, *SMALL)
    assert_one_line_error(run, 1, "not an original LDM inference config")


def test_upscaler_given_to_txt2img_is_refused(sdgen, tiny, tmp_path):
    sd = read_state_dict(tiny["sd2.safetensors"])
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 7, 3, 3)
    path = tmp_path / "x4-upscaler-ema.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(path))
    assert_one_line_error(sdgen("txt2img", "x", "--ckpt", path, *SMALL), 1, "x4 upscaler", "use 'sdgen upscale'")


@pytest.mark.parametrize(
    "args, code, needles",
    [
        (("-H", "65"), 2, ["-H/--H 65", "multiple of 8"]),
        (("-W", "0"), 2, ["-W/--W 0", "multiple of 8"]),
        (("-W", "-64"), 2, ["-W/--W -64"]),
        (("-H", "100000"), 2, ["-H/--H 100000", "larger than"]),
        (("--steps", "0"), 2, ["--steps 0", "between 1"]),
        (("--steps", "-3"), 2, ["--steps -3"]),
        (("--steps", "ten"), 2, ["--steps", "ten"]),
        (("--sampler", "magic"), 2, ["--sampler", "magic"]),
        (("--scale", "nan"), 2, ["--scale nan"]),
        (("--n_samples", "0"), 2, ["--n_samples 0"]),
        (("--n_iter", "0"), 2, ["--n_iter 0"]),
        (("--seed", "-2"), 2, ["--seed -2", "4294967295"]),
        (("--seed", "99999999999"), 2, ["--seed 99999999999"]),
        (("--seed", "abc"), 2, ["--seed", "abc"]),
        (("--precision", "fp64"), 2, ["--precision", "fp64"]),
        (("--device", "tpu"), 2, ["--device 'tpu'", "cuda:N"]),
        (("--precision", "fp16", "--device", "cpu"), 1, ["fp16 is not supported on the CPU"]),
        (("--ddim_eta", "2"), 2, ["--ddim_eta 2"]),
        (("--repeat", "3"), 2, ["--repeat", "--from-file"]),
        (("--config", "{diffusers}"), 2, ["--config", "diffusers folder"]),
        (("--outdir", "{file}"), 1, ["cannot write", "--outdir"]),
        (("--plms", "--dpm"), 2, ["choose one sampler"]),
    ],
)
def test_bad_arguments(sdgen, tiny, tiny_diffusers, tmp_path, monkeypatch, args, code, needles):
    """Every mistake is reported before any weights load (the loader is made to fail loudly if reached)."""
    from sdgen.checkpoints import load as loading

    (tmp_path / "a-file").write_text("x")
    ckpt = tiny_diffusers if "{diffusers}" in args else tiny["sd1.safetensors"]
    args = tuple({"{diffusers}": str(tiny["sd1.yaml"]), "{file}": str(tmp_path / "a-file")}.get(a, a) for a in args)
    monkeypatch.setattr(loading, "_load_single_file", _must_not_load)
    monkeypatch.setattr(loading, "_load_diffusers_folder", _must_not_load)
    run = sdgen(
        "txt2img", "x", "--ckpt", ckpt, "-H", "64", "-W", "64", "--steps", "2", "--outdir", tmp_path / "o", *args
    )
    assert_one_line_error(run, code, *needles)
    assert no_outputs(tmp_path)


def _must_not_load(*args, **kwargs):
    raise AssertionError("weights were loaded before the mistake was reported")


def test_seed_minus_one_means_random(sdgen, tiny, tmp_path):
    import json

    from PIL import Image

    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--seed", "-1", "--outdir", tmp_path)
    assert run.code == 0, run
    seed = json.loads(Image.open(run.paths[0]).info["sdgen"])["seed"]
    assert 0 <= seed <= 4294967295 and f"seed {seed} " in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda(sdgen, tiny, tmp_path):
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--device", "cuda", "--outdir", tmp_path)
    assert_one_line_error(run, 1, "--device cuda", "not available")


def test_no_prompt_is_a_usage_error(sdgen, tiny):
    run = sdgen("txt2img", "--ckpt", tiny["sd1.safetensors"], *SMALL)
    assert run.code == 2
    assert "no prompt" in run.stderr


def test_empty_prompt_file(sdgen, tiny, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n  \n")
    run = sdgen("txt2img", "--from-file", path, "--ckpt", tiny["sd1.safetensors"], *SMALL)
    assert_one_line_error(run, 1, "--from-file", "holds no prompts")


def test_prompt_file_not_utf8(sdgen, tiny, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"caf\xe9 au lait\n")
    run = sdgen("txt2img", "--from-file", path, "--ckpt", tiny["sd1.safetensors"], *SMALL)
    assert_one_line_error(run, 1, "--from-file", "not UTF-8")


BLOCK_SOCKETS = """
import socket

def _refuse(*args, **kwargs):
    raise OSError("network blocked in sdgen's tests")

socket.socket.connect = socket.socket.connect_ex = _refuse
socket.getaddrinfo = socket.create_connection = _refuse
"""


@pytest.mark.parametrize("offline_env", [False, True], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_default_model_offline_answers_at_once_from_a_new_process(tmp_path, offline_env):
    """A new `sdgen` process, nothing cached, no network (sockets refused in the child by a sitecustomize):
    the one-line answer comes in under 2 s, before torch or diffusers are imported (was 23-28 s of retries)."""
    import os
    import subprocess
    import sys
    import time

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK_SOCKETS)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(tmp_path / "site"))
    env.pop("HF_HUB_OFFLINE", None)
    if offline_env:
        env["HF_HUB_OFFLINE"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sdgen", "txt2img", "x", *SMALL, "--outdir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("Error:") == 1
    assert "no --ckpt given" in proc.stderr and "--ckpt PATH" in proc.stderr
    assert ("HF_HUB_OFFLINE" if offline_env else "cannot be reached") in proc.stderr
    assert seconds < 2, seconds


@pytest.mark.tries_network
def test_default_model_with_hf_hub_offline_set(sdgen, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = sdgen("txt2img", "x", *SMALL, "--outdir", tmp_path)
    assert_one_line_error(run, 1, "no --ckpt given", "HF_HUB_OFFLINE", "--ckpt PATH")


def test_verbose_shows_the_traceback(sdgen, tmp_path):
    run = sdgen("txt2img", "x", "--ckpt", tmp_path / "nope.ckpt", *SMALL, "--verbose")
    assert run.code == 1
    assert "Traceback" in run.stderr
