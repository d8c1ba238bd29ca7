"""sdgen txt2img end to end: CLI -> tiny checkpoint on disk -> PNG on disk."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import pixels
from PIL import Image

from sdgen.output import watermark

SMALL = ("-H", "64", "-W", "64", "--steps", "3")  # fast runs where size does not matter


def meta(path):
    info = Image.open(path).info
    return info["parameters"], json.loads(info["sdgen"])


def test_sd1_ckpt_to_watermarked_png(sdgen, tiny, no_network):
    run = sdgen(
        "txt2img",
        "a hamster painting with a brush",
        "--ckpt",
        tiny["sd1.ckpt"],
        "-H",
        "256",
        "-W",
        "256",
        "--steps",
        "10",
        "--seed",
        "42",
    )
    assert run.code == 0, run
    assert [p.name for p in run.paths] == ["00000.png"]
    path = run.paths[0]
    assert path.parent.as_posix().endswith("outputs/txt2img-samples/samples")
    img = pixels(path)
    assert img.shape == (256, 256, 3)
    assert img.std() > 1  # an image, not a flat fill
    assert watermark.read(img, 17) == b"StableDiffusionV1"
    params, data = meta(path)
    lines = params.splitlines()
    assert lines[0] == "a hamster painting with a brush"
    assert lines[1].startswith("Steps: 10, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 256x256, Model hash: ")
    assert "Model: tiny-sd1" in lines[1]
    assert data["seed"] == 42 and data["seed_mode"] == "per-image" and data["sdgen_version"]
    assert data["family"] == "sd1" and data["watermark"] is True and data["precision"] == "fp32"
    assert "pytorch_lightning" not in sys.modules  # the Lightning bookkeeping loaded without Lightning
    assert no_network == []


def test_sd2_safetensors_marks_sdv2_and_uses_scale_9(sdgen, tiny):
    run = sdgen(
        "txt2img",
        "a red fox",
        "--ckpt",
        tiny["sd2.safetensors"],
        "-H",
        "256",
        "-W",
        "256",
        "--steps",
        "4",
        "--seed",
        "7",
        "--negative-prompt",
        "blurry",
    )
    assert run.code == 0, run
    img = pixels(run.paths[0])
    assert watermark.read(img, 4) == b"SDV2"
    params, data = meta(run.paths[0])
    assert params.splitlines()[1] == "Negative prompt: blurry"
    assert "CFG scale: 9.0" in params
    assert data["v_prediction"] is False


def test_sd2v_loads_as_v_prediction_from_its_yaml(sdgen, tiny):
    run = sdgen("txt2img", "a fox", "--ckpt", tiny["sd2v.ckpt"], *SMALL, "--seed", "1")
    assert run.code == 0, run
    assert meta(run.paths[0])[1]["v_prediction"] is True
    assert "v-prediction" in run.stderr


def test_same_seed_same_png_different_seed_different(sdgen, tiny, tmp_path):
    args = ("txt2img", "a cat", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--outdir", tmp_path / "o")
    a = sdgen(*args, "--seed", "5").paths[0]
    b = sdgen(*args, "--seed", "5").paths[0]
    c = sdgen(*args, "--seed", "6").paths[0]
    assert a != b
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_ckpt_and_safetensors_of_same_weights_agree(sdgen, tiny, tmp_path):
    a = sdgen("txt2img", "x", "--ckpt", tiny["sd1.ckpt"], *SMALL, "--seed", "3", "--outdir", tmp_path / "a")
    b = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--seed", "3", "--outdir", tmp_path / "b")
    assert np.array_equal(pixels(a.paths[0]), pixels(b.paths[0]))


def test_diffusers_folder_matches_single_file(sdgen, tiny, tiny_diffusers, tmp_path):
    a = sdgen("txt2img", "x", "--ckpt", tiny_diffusers, *SMALL, "--seed", "3", "--outdir", tmp_path / "a")
    assert a.code == 0, a
    b = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--seed", "3", "--outdir", tmp_path / "b")
    assert np.abs(pixels(a.paths[0]).astype(int) - pixels(b.paths[0])).max() <= 1


def test_per_image_seeds_remake_any_image_alone(sdgen, tiny, tmp_path):
    """Image k of a per-image run is seed+k: a single run with that seed gives the same pixels."""
    batch = sdgen(
        "txt2img",
        "x",
        "--ckpt",
        tiny["sd1.safetensors"],
        *SMALL,
        "--seed",
        "10",
        "-n",
        "2",
        "--n_iter",
        "2",
        "--outdir",
        tmp_path / "batch",
    )
    assert batch.code == 0, batch
    samples = [p for p in batch.paths if p.parent.name == "samples"]
    assert [meta(p)[1]["seed"] for p in samples] == [10, 11, 12, 13]
    alone = sdgen(
        "txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--seed", "13", "--outdir", tmp_path / "alone"
    )
    assert np.abs(pixels(samples[3]).astype(int) - pixels(alone.paths[0])).max() <= 1


def test_reference_mode_draws_one_batch_of_noise(sdgen, tiny, tmp_path):
    """Reference mode: one generator, the batch's noise in one call; equal to per-image for one image."""
    common = ("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--seed", "10", "--skip_grid")
    ref = sdgen(*common, "-n", "2", "--seed-mode", "reference", "--outdir", tmp_path / "ref").paths
    per = sdgen(*common, "-n", "2", "--outdir", tmp_path / "per").paths
    single_ref = sdgen(*common, "--seed-mode", "reference", "--outdir", tmp_path / "one").paths[0]
    assert np.abs(pixels(ref[0]).astype(int) - pixels(per[0])).max() <= 1  # same first draw
    assert not np.array_equal(pixels(ref[1]), pixels(per[1]))  # continuation vs seed+1
    assert np.abs(pixels(single_ref).astype(int) - pixels(per[0])).max() <= 1
    assert [meta(p)[1]["seed"] for p in ref] == [10, 10]
    assert meta(ref[1])[1]["seed_mode"] == "reference" and meta(ref[1])[1]["batch_index"] == 1


def test_fixed_code_reuses_start_noise(sdgen, tiny, tmp_path):
    run = sdgen(
        "txt2img",
        "x",
        "--ckpt",
        tiny["sd1.safetensors"],
        *SMALL,
        "--seed",
        "1",
        "--n_iter",
        "2",
        "--fixed_code",
        "--seed-mode",
        "reference",
        "--skip_grid",
        "--outdir",
        tmp_path,
    )
    a, b = run.paths
    assert np.array_equal(pixels(a), pixels(b))


def test_batches_grid_and_numbering(sdgen, tiny, tmp_path):
    out = tmp_path / "o"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "00007.png").write_bytes(b"not ours")
    run = sdgen(
        "txt2img",
        "x",
        "--ckpt",
        tiny["sd1.safetensors"],
        *SMALL,
        "-n",
        "2",
        "--n_iter",
        "2",
        "--seed",
        "1",
        "--outdir",
        out,
    )
    assert run.code == 0, run
    names = [p.name for p in run.paths]
    assert names == ["00008.png", "00009.png", "00010.png", "00011.png", "grid-0000.png"]
    grid = pixels(run.paths[-1])
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 3)  # 2 rows of 2, 2-pixel gaps as make_grid
    assert (out / "samples" / "00007.png").read_bytes() == b"not ours"
    assert not list(out.rglob("*.tmp"))


def test_from_file_with_partial_last_batch(sdgen, tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\na bird\n", encoding="utf-8")
    run = sdgen(
        "txt2img",
        "--from-file",
        prompts,
        "--ckpt",
        tiny["sd1.safetensors"],
        *SMALL,
        "-n",
        "2",
        "--seed",
        "1",
        "--skip_grid",
    )
    assert run.code == 0, run
    assert [meta(p)[1]["prompt"] for p in run.paths] == ["a cat", "a dog", "a bird"]


def test_skip_save_keeps_only_grid(sdgen, tiny, tmp_path):
    run = sdgen(
        "txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "-n", "2", "--skip_save", "--outdir", tmp_path
    )
    assert [p.name for p in run.paths] == ["grid-0000.png"]


def test_small_images_are_saved_without_watermark_and_say_so_once(sdgen, tiny):
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "-n", "2", "--skip_grid")
    assert run.code == 0, run
    assert run.stderr.count("too small for the invisible watermark") == 1
    assert meta(run.paths[0])[1]["watermark"] is False


def test_no_watermark_flag(sdgen, tiny):
    run = sdgen(
        "txt2img", "x", "--ckpt", tiny["sd1.safetensors"], "-H", "256", "-W", "256", "--steps", "2", "--no-watermark"
    )
    assert meta(run.paths[0])[1]["watermark"] is False
    assert watermark.read(pixels(run.paths[0]), 17) != b"StableDiffusionV1"


def test_long_prompt_says_it_was_cut(sdgen, tiny):
    run = sdgen("txt2img", "word " * 100, "--ckpt", tiny["sd1.safetensors"], *SMALL)
    assert run.code == 0, run
    assert "prompt cut to 75 of its 100 tokens" in run.stderr


def test_reference_spellings_work(sdgen, tiny, tmp_path):
    run = sdgen(
        "txt2img",
        "--prompt",
        "hello world",
        "--plms",
        "--ckpt",
        tiny["sd1.ckpt"],
        "--skip_grid",
        "--n_samples",
        "1",
        "--ddim_steps",
        "3",
        "--H",
        "64",
        "--W",
        "64",
        "--precision",
        "full",
        "--outdir",
        tmp_path,
    )
    assert run.code == 0, run
    assert meta(run.paths[0])[1]["sampler"] == "plms"


@pytest.mark.parametrize(
    "sampler", ["ddim", "plms", "dpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "heun", "unipc"]
)
def test_every_sampler_makes_an_image(sdgen, tiny, sampler, tmp_path):
    run = sdgen(
        "txt2img", "x", "--ckpt", tiny["sd2v.ckpt"], *SMALL, "--sampler", sampler, "--seed", "2", "--outdir", tmp_path
    )
    assert run.code == 0, run
    img = pixels(run.paths[0])
    assert img.shape == (64, 64, 3) and img.std() > 0.5
    assert meta(run.paths[0])[1]["sampler"] == sampler


def test_quiet_prints_only_paths(sdgen, tiny):
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "-q")
    assert run.code == 0
    assert run.stdout.strip().endswith("00000.png")
    assert "sdgen:" not in run.stderr and "%" not in run.stderr


def test_random_seed_is_printed_and_recorded(sdgen, tiny):
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL)
    seed = meta(run.paths[0])[1]["seed"]
    assert f"seed {seed} " in run.stderr


def test_sd2v_diffusers_folder_matches_single_file(sdgen, tiny, tmp_path):
    from conftest import save_as_diffusers

    folder = save_as_diffusers(tiny["sd2v.ckpt"], tmp_path / "sd2v-diffusers")
    a = sdgen("txt2img", "x", "--ckpt", folder, *SMALL, "--seed", "3", "--outdir", tmp_path / "a")
    assert a.code == 0, a
    assert meta(a.paths[0])[1]["v_prediction"] is True and meta(a.paths[0])[1]["family"] == "sd2"
    b = sdgen("txt2img", "x", "--ckpt", tiny["sd2v.ckpt"], *SMALL, "--seed", "3", "--outdir", tmp_path / "b")
    assert np.abs(pixels(a.paths[0]).astype(int) - pixels(b.paths[0])).max() <= 1


def test_model_hash_is_a1111s_sha256_prefix(sdgen, tiny):
    import hashlib

    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL)
    expected = hashlib.sha256(tiny["sd1.safetensors"].read_bytes()).hexdigest()[:10]
    assert f"Model hash: {expected}," in meta(run.paths[0])[0]


def test_yaml_naming_hub_text_encoders_downloads_nothing(sdgen, tiny, tmp_path):
    """The reference yamls name their text encoders by hub id; the weights come from the checkpoint."""
    import yaml

    config = yaml.safe_load(tiny["sd2.yaml"].read_text())
    config["model"]["params"]["cond_stage_config"]["params"].update(arch="ViT-H-14", version="laion2b_s32b_b79k")
    path = tmp_path / "hub-names.yaml"
    path.write_text(yaml.safe_dump(config))
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd2.safetensors"], "--config", path, *SMALL)
    assert run.code == 0, run  # and the autouse fixture asserts that no connection was attempted


def test_grid_of_a_prompt_file_records_every_prompt_and_seed(sdgen, tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na bird\n", encoding="utf-8")
    run = sdgen(
        "txt2img",
        "--from-file",
        prompts,
        "--ckpt",
        tiny["sd1.safetensors"],
        *SMALL,
        "-n",
        "2",
        "--seed",
        "4",
        "--outdir",
        tmp_path / "o",
    )
    assert run.code == 0, run
    params, data = meta(run.paths[-1])
    assert data["grid"] is True
    assert data["prompts"] == ["a cat", "a dog", "a bird"] and data["seeds"] == [4, 5, 6]
    assert params.splitlines()[:3] == ["a cat", "a dog", "a bird"]
