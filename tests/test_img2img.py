"""sdgen img2img end to end on the tiny checkpoints."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import gradient_image, pixels
from PIL import Image
from test_errors import assert_one_line_error

FAST = ("--steps", "4")


def meta(path):
    return json.loads(Image.open(path).info["sdgen"]), Image.open(path).info["parameters"]


def test_img2img_keeps_size_and_records_init(sdgen, tiny, tmp_path):
    init = gradient_image(tmp_path / "sketch.png", 96, 64)
    run = sdgen(
        "img2img",
        "--prompt",
        "a bird on a branch",
        "--init-img",
        init,
        "--ckpt",
        tiny["sd1.ckpt"],
        "--strength",
        "0.5",
        "--seed",
        "3",
        *FAST,
    )
    assert run.code == 0, run
    (path,) = run.paths
    assert path.parent.as_posix().endswith("outputs/img2img-samples/samples")
    assert pixels(path).shape == (64, 96, 3)
    data, params = meta(path)
    assert data["init_image_sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()
    assert data["strength"] == 0.5 and data["mode"] == "img2img"
    assert "Denoising strength: 0.5" in params and "CFG scale: 5.0" in params  # reference img2img default


def test_size_rounds_down_to_8_and_says_so(sdgen, tiny, tmp_path):
    init = gradient_image(tmp_path / "odd.png", 70, 67)
    run = sdgen("img2img", "x", "--init-img", init, "--ckpt", tiny["sd1.safetensors"], *FAST)
    assert run.code == 0, run
    assert pixels(run.paths[0]).shape == (64, 64, 3)
    assert "resized the input from 70x67 to 64x64" in run.stderr


def test_h_w_resize_the_init_image_first(sdgen, tiny, tmp_path):
    init = gradient_image(tmp_path / "a.png", 64, 64)
    run = sdgen("img2img", "x", "--init-img", init, "--ckpt", tiny["sd1.safetensors"], "-W", "80", "-H", "48", *FAST)
    assert pixels(run.paths[0]).shape == (48, 80, 3)


@pytest.mark.parametrize("mode, suffix", [("RGBA", ".png"), ("P", ".png"), ("L", ".jpg"), ("RGB", ".webp")])
def test_image_modes_and_formats(sdgen, tiny, tmp_path, mode, suffix):
    init = gradient_image(tmp_path / f"in{suffix}", 64, 64, mode)
    run = sdgen("img2img", "x", "--init-img", init, "--ckpt", tiny["sd1.safetensors"], *FAST)
    assert run.code == 0, run
    assert pixels(run.paths[0]).shape == (64, 64, 3)


def test_exif_orientation_is_honoured(sdgen, tiny, tmp_path):
    img = Image.fromarray(np.zeros((64, 96, 3), np.uint8))  # landscape on disk...
    exif = img.getexif()
    exif[0x0112] = 6  # ...shown rotated 90 degrees: portrait
    img.save(tmp_path / "phone.jpg", exif=exif)
    run = sdgen("img2img", "x", "--init-img", tmp_path / "phone.jpg", "--ckpt", tiny["sd1.safetensors"], *FAST)
    assert pixels(run.paths[0]).shape == (96, 64, 3)


def test_deterministic_and_seed_sensitive(sdgen, tiny, tmp_path):
    init = gradient_image(tmp_path / "a.png", 64, 64)
    args = ("img2img", "x", "--init-img", init, "--ckpt", tiny["sd1.safetensors"], *FAST)
    a = sdgen(*args, "--seed", "1").paths[0]
    b = sdgen(*args, "--seed", "1").paths[0]
    c = sdgen(*args, "--seed", "2").paths[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_strength_0_is_the_vae_round_trip(sdgen, tiny, tmp_path):
    """Strength 0 runs no denoising step: prompt and scale cannot matter."""
    init = gradient_image(tmp_path / "a.png", 64, 64)
    common = ("img2img", "--init-img", init, "--ckpt", tiny["sd1.safetensors"], "--strength", "0", "--seed", "4")
    a = sdgen(*common, "a cat", "--scale", "3").paths[0]
    b = sdgen(*common, "a dog", "--scale", "12").paths[0]
    assert np.array_equal(pixels(a), pixels(b))


def test_strength_1_ignores_the_init_image(sdgen, tiny, tmp_path):
    one = gradient_image(tmp_path / "one.png", 64, 64)
    two = tmp_path / "two.png"
    Image.fromarray(255 - pixels(one)).save(two)
    common = ("img2img", "x", "--ckpt", tiny["sd1.safetensors"], "--strength", "1", "--seed", "4", *FAST)
    a = sdgen(*common, "--init-img", one).paths[0]
    b = sdgen(*common, "--init-img", two).paths[0]
    assert np.array_equal(pixels(a), pixels(b))
    c = sdgen(
        "img2img", "x", "--ckpt", tiny["sd1.safetensors"], "--strength", "0.5", "--seed", "4", *FAST, "--init-img", two
    ).paths[0]
    assert not np.array_equal(pixels(a), pixels(c))


def test_reference_and_per_image_coincide_for_one_image(sdgen, tiny, tmp_path):
    init = gradient_image(tmp_path / "a.png", 64, 64)
    common = ("img2img", "x", "--init-img", init, "--ckpt", tiny["sd1.safetensors"], "--seed", "9", *FAST)
    a = sdgen(*common, "--seed-mode", "reference", "--outdir", tmp_path / "r").paths[0]
    b = sdgen(*common, "--outdir", tmp_path / "p").paths[0]
    assert np.abs(pixels(a).astype(int) - pixels(b)).max() <= 1


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "euler_a", "dpmpp_2m", "heun"])
def test_samplers_start_part_way(sdgen, tiny, tmp_path, sampler):
    init = gradient_image(tmp_path / "a.png", 64, 64)
    run = sdgen("img2img", "x", "--init-img", init, "--ckpt", tiny["sd2v.ckpt"], "--sampler", sampler, *FAST)
    assert run.code == 0, run


@pytest.mark.parametrize(
    "args, needles",
    [
        (("--strength", "1.5"), ["--strength 1.5", "between 0 and 1"]),
        (("--strength", "-0.1"), ["--strength -0.1"]),
        (("--strength", "nan"), ["--strength nan"]),
        (("--sampler", "plms"), ["plms", "ddim"]),
        (("--plms",), ["No such option", "--plms"]),
    ],
)
def test_bad_img2img_arguments(sdgen, tiny, tmp_path, args, needles):
    init = gradient_image(tmp_path / "a.png", 64, 64)
    run = sdgen(
        "img2img", "x", "--init-img", init, "--ckpt", tiny["sd1.safetensors"], *FAST, *args, "--outdir", tmp_path / "o"
    )
    assert_one_line_error(run, 2, *needles)
    assert not (tmp_path / "o").exists()


def test_missing_and_non_image_init(sdgen, tiny, tmp_path):
    run = sdgen("img2img", "x", "--init-img", tmp_path / "none.png", "--ckpt", tiny["sd1.safetensors"])
    assert_one_line_error(run, 1, "--init-img", "none.png", "no such file")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    run = sdgen("img2img", "x", "--init-img", text, "--ckpt", tiny["sd1.safetensors"])
    assert_one_line_error(run, 1, "--init-img", "notes.png", "not an image")


def test_truncated_init_image(sdgen, tiny, tmp_path):
    full = gradient_image(tmp_path / "full.png", 64, 64).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(full[: len(full) // 2])
    run = sdgen("img2img", "x", "--init-img", cut, "--ckpt", tiny["sd1.safetensors"])
    assert_one_line_error(run, 1, "--init-img", "cut.png", "truncated")


def test_missing_init_option_is_usage_error(sdgen, tiny):
    run = sdgen("img2img", "x", "--ckpt", tiny["sd1.safetensors"])
    assert run.code == 2 and "--init-img" in run.stderr
