"""sdgen upscale end to end on a tiny x4 upscaler checkpoint."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from conftest import gradient_image, pixels
from PIL import Image
from test_errors import assert_one_line_error

from sdgen.output import watermark

FAST = ("--steps", "3")


def test_upscale_4x_watermarked_with_metadata(sdgen, tiny, tmp_path):
    src = gradient_image(tmp_path / "photo.png", 64, 64)
    run = sdgen("upscale", src, "--ckpt", tiny["x4.safetensors"], "--prompt", "a white cat", "--seed", "5", *FAST)
    assert run.code == 0, run
    (path,) = run.paths
    assert path.parent.as_posix().endswith("outputs/upscale-samples/samples")
    img = pixels(path)
    assert img.shape == (256, 256, 3)
    assert watermark.read(img, 4) == b"SDV2"
    info = Image.open(path).info
    data = json.loads(info["sdgen"])
    assert data["noise_level"] == 20 and data["steps"] == 3 and data["scale"] == 9.0
    assert data["input_image_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert "Noise level: 20" in info["parameters"]


def test_several_inputs_odd_sizes_are_exactly_4x(sdgen, tiny, tmp_path):
    a = gradient_image(tmp_path / "a.png", 36, 20)
    b = gradient_image(tmp_path / "b.jpg", 24, 40)
    run = sdgen("upscale", a, b, "--ckpt", tiny["x4.safetensors"], *FAST, "--noise-level", "50")
    assert run.code == 0, run
    assert [pixels(p).shape for p in run.paths] == [(80, 144, 3), (160, 96, 3)]


def test_deterministic(sdgen, tiny, tmp_path):
    src = gradient_image(tmp_path / "a.png", 32, 32)
    a = sdgen("upscale", src, "--ckpt", tiny["x4.safetensors"], *FAST, "--seed", "1").paths[0]
    b = sdgen("upscale", src, "--ckpt", tiny["x4.safetensors"], *FAST, "--seed", "1").paths[0]
    assert np.array_equal(pixels(a), pixels(b))


def test_tiled_agrees_with_untiled_and_shows_no_tile_grid(sdgen, tmp_path):
    """64x64 input, untiled vs 32-pixel tiles (3x3 tiles, 8 overlap, blended). With random weights the UNet's
    attention is global within a tile, so tiling changes pixels everywhere a little: we require the tiled
    image to be far closer to the untiled one than another seed is (measured: correlation 0.93 vs 0.12,
    mean difference 18 vs 70 levels), and no jump at the tile boundaries."""
    from sdgen.testing.ldm_layout import write_tiny

    ckpt, _ = write_tiny("x4", tmp_path / "contrast", contrast=1.0)  # full contrast: differences stay visible
    src = gradient_image(tmp_path / "a.png", 64, 64)
    common = ("upscale", src, "--ckpt", ckpt, "--steps", "4", "--no-watermark")
    whole = pixels(sdgen(*common, "--tile", "0", "--seed", "2", "--outdir", tmp_path / "u").paths[0]).astype(float)
    tiled = pixels(sdgen(*common, "--tile", "32", "--seed", "2", "--outdir", tmp_path / "t").paths[0]).astype(float)
    other = pixels(sdgen(*common, "--tile", "0", "--seed", "3", "--outdir", tmp_path / "o").paths[0]).astype(float)
    assert np.corrcoef(whole.ravel(), tiled.ravel())[0, 1] > 0.85
    assert np.abs(whole - tiled).mean() < 0.4 * np.abs(whole - other).mean()
    # tiles start at latent columns 24 and 32 and end at 32 and 56: output columns 4x those
    jumps = np.abs(np.diff(tiled, axis=1)).mean(axis=(0, 2))
    boundaries = [4 * c - 1 for c in (24, 32, 56)]
    assert jumps[boundaries].max() <= 1.5 * np.percentile(jumps, 95)


def test_noise_level_out_of_range(sdgen, tiny, tmp_path):
    src = gradient_image(tmp_path / "a.png", 32, 32)
    run = sdgen("upscale", src, "--ckpt", tiny["x4.safetensors"], "--noise-level", "351")
    assert_one_line_error(run, 2, "--noise-level 351", "0 and 350")


def test_sd_checkpoint_given_to_upscale(sdgen, tiny, tmp_path):
    src = gradient_image(tmp_path / "a.png", 32, 32)
    run = sdgen("upscale", src, "--ckpt", tiny["sd1.safetensors"])
    assert_one_line_error(run, 1, "SD 1.x", "needs SD x4 upscaler", "txt2img")


def test_upscaler_given_to_txt2img(sdgen, tiny):
    run = sdgen("txt2img", "x", "--ckpt", tiny["x4.safetensors"], "-H", "64", "-W", "64")
    assert_one_line_error(run, 1, "x4 upscaler", "use 'sdgen upscale'")


def test_bad_input_image(sdgen, tiny, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnonsense")
    run = sdgen("upscale", bad, "--ckpt", tiny["x4.safetensors"])
    assert_one_line_error(run, 1, "bad.png")


def test_upscaler_from_a_diffusers_folder_matches_the_single_file(sdgen, tiny, tmp_path):
    from conftest import save_as_diffusers

    folder = save_as_diffusers(tiny["x4.safetensors"], tmp_path / "x4-diffusers")
    src = gradient_image(tmp_path / "a.png", 32, 32)
    a = sdgen("upscale", src, "--ckpt", folder, *FAST, "--seed", "4", "--outdir", tmp_path / "a")
    assert a.code == 0, a
    b = sdgen("upscale", src, "--ckpt", tiny["x4.safetensors"], *FAST, "--seed", "4", "--outdir", tmp_path / "b")
    assert np.abs(pixels(a.paths[0]).astype(int) - pixels(b.paths[0])).max() <= 1


def test_upscale_needs_a_checkpoint(sdgen, tmp_path):
    src = gradient_image(tmp_path / "a.png", 32, 32)
    run = sdgen("upscale", src)
    assert run.code == 2 and "--ckpt is required" in run.stderr
