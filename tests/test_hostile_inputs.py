"""Inputs as an attacker (or a tired user) gives them: each ends in one clear line, in bounded time, with
no output file, or is read correctly; never silently wrong pixels (issue 16)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from conftest import pixels
from PIL import Image
from test_errors import assert_one_line_error, no_outputs

from sdgen.images import MAX_INPUT_PIXELS, load_rgb

SMALL = ("-H", "64", "-W", "64", "--steps", "2")


@pytest.fixture(autouse=True)
def bounded_time():
    """A read that blocks (a FIFO opened for reading) would hang the test: fail it after 60 s instead."""

    def expired(*_):
        raise TimeoutError("the input blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---- images: converted by scaling, or refused by mode -----------------------------------------------------


def test_16_bit_grayscale_is_scaled_not_clipped_to_white(tmp_path):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16).repeat(8, 0)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # a 16-bit grayscale PNG
    assert Image.open(path).mode.startswith("I")
    got = np.array(load_rgb(path, "--init-img"))
    assert got.shape == (8, 4, 3) and got.dtype == np.uint8
    assert got[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (got[..., 0] == got[..., 2]).all()


def test_float_image_in_0_1_is_scaled_by_255_with_clamping(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32).repeat(4, 0)
    path = tmp_path / "float.tiff"
    Image.fromarray(values, mode="F").save(path)
    got = np.array(load_rgb(path, "--init-img"))
    assert got[0, :, 1].tolist() == [0, 128, 255, 255, 0, 0]


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "1", "I;16"])
def test_other_modes_become_rgb(mode, tmp_path):
    img = Image.new("RGB", (16, 16), (200, 100, 50)).convert(mode)
    path = tmp_path / f"in-{mode.replace(';', '')}.{'tiff' if mode == 'CMYK' else 'png'}"
    img.save(path)
    got = load_rgb(path, "--init-img")
    assert got.mode == "RGB" and got.size == (16, 16)


def test_an_unsupported_mode_is_refused_by_name(sdgen, tiny, tmp_path):
    path = tmp_path / "lab.tiff"
    Image.new("LAB", (64, 64), (50, 0, 0)).save(path)
    run = sdgen("img2img", "x", "--init-img", path, "--ckpt", tiny["sd1.safetensors"], "--outdir", tmp_path / "o")
    assert_one_line_error(run, 1, "--init-img", "mode LAB", "8-bit RGB")
    assert no_outputs(tmp_path / "o")


def test_too_many_pixels_is_refused_before_decoding(sdgen, tiny, tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (10000, 10000)).save(path)  # 100 M pixels, a few KB on disk
    assert 10000 * 10000 > MAX_INPUT_PIXELS
    run = sdgen("upscale", path, "--ckpt", tiny["x4.safetensors"], "--outdir", tmp_path / "out")
    assert_one_line_error(run, 1, "10000x10000", "scale it down")
    assert no_outputs(tmp_path / "out")


# ---- only regular files are read ------------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def test_a_fifo_as_init_image_is_refused_without_blocking(sdgen, tiny, fifo, tmp_path):
    run = sdgen("img2img", "x", "--init-img", fifo, "--ckpt", tiny["sd1.safetensors"], "--outdir", tmp_path)
    assert_one_line_error(run, 1, "--init-img", "not a regular file")


def test_a_fifo_as_upscale_input_is_refused_without_blocking(sdgen, tiny, fifo, tmp_path):
    run = sdgen("upscale", fifo, "--ckpt", tiny["x4.safetensors"], "--outdir", tmp_path)
    assert_one_line_error(run, 1, "not a regular file")


@pytest.mark.parametrize("source", ["fifo", "/dev/zero"])
def test_a_prompt_file_that_never_ends_is_refused(sdgen, tiny, fifo, tmp_path, source):
    path = fifo if source == "fifo" else source
    run = sdgen("txt2img", "--from-file", path, "--ckpt", tiny["sd1.safetensors"], *SMALL, "--outdir", tmp_path)
    assert_one_line_error(run, 1, "--from-file", "not a regular file")
    assert no_outputs(tmp_path)


def test_an_oversized_prompt_file_is_refused(sdgen, tiny, tmp_path, monkeypatch):
    from sdgen import specs

    monkeypatch.setattr(specs, "MAX_PROMPT_FILE", 1000)
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n" * 1000)
    run = sdgen("txt2img", "--from-file", path, "--ckpt", tiny["sd1.safetensors"], *SMALL, "--outdir", tmp_path)
    assert_one_line_error(run, 1, "--from-file", "6000 bytes, more than the 1000 allowed")


# ---- counts are bounded before anything is built --------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--n_iter", "300000000"), "--n_iter 300000000: must be between 1 and 100000"),
        (("--n_samples", str(10**20)), "--n_samples"),
        (("--from-file", "{file}", "--repeat", str(10**20)), "must be between 1 and 10000"),
        (("--from-file", "{file}", "--repeat", "10000"), "more than the 1000000 one run takes"),
    ],
)
def test_huge_counts_are_refused_at_once(sdgen, tiny, tmp_path, args, needle):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n" * 101)
    args = tuple(str(prompts) if a == "{file}" else a for a in args)
    first = () if "--from-file" in args else ("x",)
    run = sdgen("txt2img", *first, "--ckpt", tiny["sd1.safetensors"], *SMALL, *args, "--outdir", tmp_path)
    assert_one_line_error(run, 2, needle)
    assert no_outputs(tmp_path)


# ---- seeds stay in range -----------------------------------------------------------------------------------


def test_seeds_past_the_last_one_wrap_to_0_and_each_png_can_be_made_again(sdgen, tiny, tmp_path):
    ckpt = tiny["sd1.safetensors"]
    run = sdgen("txt2img", "x", "--ckpt", ckpt, *SMALL, "--seed", "4294967295", "-n", "2", "--outdir", tmp_path / "a")
    assert run.code == 0, run
    samples = sorted((tmp_path / "a" / "samples").glob("*.png"))
    seeds = [Image.open(p).info["parameters"].split("Seed: ")[1].split(",")[0] for p in samples]
    assert seeds == ["4294967295", "0"]
    again = sdgen("txt2img", "x", "--ckpt", ckpt, *SMALL, "--seed", "0", "--outdir", tmp_path / "b")
    assert again.code == 0, again
    assert np.array_equal(pixels(samples[1]), pixels(sorted((tmp_path / "b" / "samples").glob("*.png"))[0]))


def test_a_fifo_as_checkpoint_or_config_is_refused_without_blocking(sdgen, tiny, fifo, tmp_path):
    run = sdgen("txt2img", "x", "--ckpt", fifo, *SMALL, "--outdir", tmp_path)
    assert_one_line_error(run, 1, "--ckpt", "not a regular file")
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], "--config", fifo, *SMALL, "--outdir", tmp_path)
    assert_one_line_error(run, 1, "--config", "not a regular file")
    assert no_outputs(tmp_path)


# ---- edges of options and output -------------------------------------------------------------------------


def test_a_prompt_that_is_not_utf8_is_a_usage_error(sdgen, tiny, tmp_path):
    run = sdgen("txt2img", "caf\udce9", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--outdir", tmp_path)
    assert_one_line_error(run, 2, "prompt 1 is not valid UTF-8 text")
    assert no_outputs(tmp_path)


def test_bf16_and_another_precision_contradict(sdgen, tiny, tmp_path):
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--precision", "fp32", "--bf16")
    assert run.code == 2 and "--bf16 and --precision fp32 contradict" in run.stderr, run


def test_stdout_closed_early_ends_quietly_with_every_image_kept(tiny, tmp_path):
    import subprocess
    import sys

    args = ["txt2img", "x", "--ckpt", str(tiny["sd1.safetensors"]), *SMALL, "--n_iter", "3", "--skip_grid"]
    code = (
        f"import sys\nfrom sdgen.cli import main\nsys.argv = ['sdgen'] + {args + ['--outdir', str(tmp_path)]!r}\nmain()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert first.strip().endswith(b"00000.png")
    assert "Traceback" not in err and "Error" not in err and "Exception" not in err, err
    assert len(list((tmp_path / "samples").glob("*.png"))) == 3


# ---- yaml values of the wrong type, shape or size ----------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "name", "value", "needle"),
    [
        ("unet", "model_channels", "abc", "model_channels is 'abc'; it must be an integer from 32 to 4096"),
        ("unet", "channel_mult", [], "channel_mult is []; it must be a list of 1 to 8 integers"),
        ("unet", "channel_mult", [[1, 2]], "channel_mult is [[1, 2]]"),
        ("unet", "num_res_blocks", 1000000000, "num_res_blocks is 1000000000"),
        ("unet", "transformer_depth", [1, 1, 1], "transformer_depth has 3 entries; channel_mult has 2"),
        ("vae", "ch_mult", "1,2", "ddconfig.ch_mult is '1,2'"),
        ("model", "timesteps", 0, "timesteps is 0; it must be an integer from 1 to 100000"),
        ("model", "scale_factor", 0, "scale_factor is 0; it must be a number"),
    ],
)
def test_bad_yaml_values_name_the_field_and_what_is_allowed(sdgen, tiny, tmp_path, section, name, value, needle):
    import yaml

    config = yaml.safe_load(tiny["sd1.yaml"].read_text())
    params = config["model"]["params"]
    target = {
        "model": params,
        "unet": params["unet_config"]["params"],
        "vae": params["first_stage_config"]["params"]["ddconfig"],
    }[section]
    target[name] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], "--config", bad, *SMALL, "--outdir", tmp_path)
    assert_one_line_error(run, 1, "--config", needle)
    assert no_outputs(tmp_path)


def test_a_protocol_4_checkpoint_is_not_called_hostile(sdgen, tiny, tmp_path):
    """torch's weights-only loader cannot read pickle protocol 4 (FRAME, STACK_GLOBAL): say so, not 'unsafe'."""
    import torch

    from sdgen.checkpoints.files import read_state_dict

    ckpt = tmp_path / "p4.ckpt"
    torch.save({"state_dict": dict(read_state_dict(tiny["sd1.safetensors"]))}, ckpt, pickle_protocol=4)
    run = sdgen("txt2img", "x", "--ckpt", ckpt, *SMALL, "--outdir", tmp_path / "o")
    assert_one_line_error(run, 1, "pickle protocol 4 or later", "pickle_protocol=2")
    assert "refused" not in run.stderr
