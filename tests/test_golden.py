"""Golden values: the numbers that every sampler, the guidance and the noise order produce, pinned.

Recorded from the code that matched the original CompVis/Stability scripts within 1 level (see the README's
fidelity section). Each case runs the real CLI on a tiny checkpoint at full contrast (so that every change in
the latents reaches the pixels) and compares, per PNG, the bottom-right 3x3 pixels of the blue channel
(within 1 level: float rounding differs between CPUs) and the mean of all pixels (within 0.01 levels; a
changed sampler step, guidance formula or noise draw moves it by more in most cases, and the suite as a whole
fails on each: see the README's 'Golden tests').

To re-record after an intended change: ``SDGEN_GOLDEN_RECORD=golden.json python -m pytest tests/test_golden.py``
and paste the printed values, saying in the commit why the numbers moved.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import gradient_image, pixels
from PIL import Image

RECORD = os.environ.get("SDGEN_GOLDEN_RECORD")
SMALL = ("-H", "64", "-W", "64", "--seed", "7", "--skip_grid")

# name -> (checkpoint key, arguments after the checkpoint)
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    **{
        f"sd2v-{s}": ("sd2v", ("txt2img", "a fox", *SMALL, "--steps", "5", "--sampler", s))
        for s in ("ddim", "plms", "dpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "heun", "unipc")
    },
    **{
        f"sd1-{s}": ("sd1", ("txt2img", "a cat", *SMALL, "--steps", "5", "--sampler", s))
        for s in ("ddim", "plms", "dpm", "euler_a")
    },
    "sd1-ddim-eta": ("sd1", ("txt2img", "a cat", *SMALL, "--steps", "5", "--ddim_eta", "0.5")),
    "sd1-negative-scale3": (
        "sd1",
        ("txt2img", "a cat", *SMALL, "--steps", "4", "--scale", "3", "--negative-prompt", "a dog"),
    ),
    "sd1-batch2-per-image": ("sd1", ("txt2img", "a cat", *SMALL, "--steps", "4", "-n", "2", "--n_iter", "2")),
    "sd1-batch2-reference": (
        "sd1",
        (
            "txt2img",
            "a cat",
            *SMALL,
            "--steps",
            "4",
            "-n",
            "2",
            "--n_iter",
            "2",
            "--seed-mode",
            "reference",
            "--ddim_eta",
            "0.3",
        ),
    ),
    "sd1-img2img-ddim": (
        "sd1",
        (
            "img2img",
            "a bird",
            "--init-img",
            "{init}",
            "--strength",
            "0.5",
            "--steps",
            "6",
            "--seed",
            "7",
            "-n",
            "2",
            "--skip_grid",
        ),
    ),
    "sd1-img2img-reference": (
        "sd1",
        (
            "img2img",
            "a bird",
            "--init-img",
            "{init}",
            "--strength",
            "0.5",
            "--steps",
            "6",
            "--seed",
            "7",
            "-n",
            "2",
            "--skip_grid",
            "--seed-mode",
            "reference",
        ),
    ),
    "sd2v-img2img-euler": (
        "sd2v",
        (
            "img2img",
            "a bird",
            "--init-img",
            "{init}",
            "--strength",
            "0.5",
            "--steps",
            "6",
            "--seed",
            "7",
            "--sampler",
            "euler",
        ),
    ),
    "sd2v-img2img-dpm": (
        "sd2v",
        (
            "img2img",
            "a bird",
            "--init-img",
            "{init}",
            "--strength",
            "0.5",
            "--steps",
            "6",
            "--seed",
            "7",
            "--sampler",
            "dpm",
        ),
    ),
    "x4-untiled": ("x4", ("upscale", "{small}", "--steps", "4", "--seed", "3", "--prompt", "a cat")),
    "x4-tiled": (
        "x4",
        (
            "upscale",
            "{large}",
            "{small}",
            "--steps",
            "3",
            "--seed",
            "3",
            "--tile",
            "32",
            "--prompt",
            "a cat",
            "--negative-prompt",
            "blurry",
        ),
    ),
    "x4-reference": (
        "x4",
        (
            "upscale",
            "{small}",
            "{small}",
            "--steps",
            "3",
            "--seed",
            "3",
            "--seed-mode",
            "reference",
            "--prompt",
            "a cat",
            "--negative-prompt",
            "blurry",
        ),
    ),
    "sd1-low-vram": ("sd1", ("txt2img", "a cat", *SMALL, "--steps", "4", "--low-vram")),
}

GOLDEN: dict[str, list[tuple[list[int], float]]] = {  # recorded 2026-12-01 from commit 6912657's numerics
    "sd2v-ddim": [([146, 134, 121, 128, 122, 121, 119, 121, 116], 127.584)],
    "sd2v-plms": [([150, 147, 128, 138, 134, 128, 120, 125, 119], 128.091)],
    "sd2v-dpm": [([143, 134, 122, 124, 120, 120, 115, 119, 115], 127.813)],
    "sd2v-euler": [([137, 125, 119, 113, 106, 113, 111, 113, 111], 127.456)],
    "sd2v-euler_a": [([129, 117, 103, 127, 113, 99, 111, 100, 95], 127.776)],
    "sd2v-dpmpp_2m": [([143, 134, 122, 125, 120, 120, 115, 119, 115], 127.83)],
    "sd2v-dpmpp_2m_karras": [([149, 142, 125, 128, 129, 127, 117, 126, 120], 127.328)],
    "sd2v-lms": [([138, 126, 120, 113, 105, 113, 111, 113, 112], 127.557)],
    "sd2v-heun": [([150, 142, 128, 120, 119, 121, 114, 121, 117], 127.87)],
    "sd2v-unipc": [([143, 134, 122, 125, 120, 120, 115, 119, 115], 127.912)],
    "sd1-ddim": [([188, 181, 134, 173, 169, 145, 150, 156, 141], 128.172)],
    "sd1-plms": [([199, 187, 137, 178, 173, 147, 155, 157, 139], 128.33)],
    "sd1-dpm": [([189, 184, 137, 174, 172, 147, 152, 159, 141], 128.148)],
    "sd1-euler_a": [([173, 169, 128, 162, 157, 136, 146, 149, 132], 127.969)],
    "sd1-ddim-eta": [([186, 177, 132, 170, 162, 140, 150, 152, 135], 128.017)],
    "sd1-negative-scale3": [([187, 177, 137, 164, 165, 148, 141, 154, 136], 128.235)],
    "sd1-batch2-per-image": [
        ([179, 171, 130, 168, 160, 139, 148, 152, 138], 128.179),
        ([121, 104, 91, 141, 119, 104, 120, 102, 111], 128.294),
        ([99, 108, 99, 84, 90, 101, 113, 109, 107], 127.571),
        ([0, 0, 63, 35, 46, 83, 53, 86, 108], 128.845),
    ],
    "sd1-batch2-reference": [
        ([181, 173, 129, 171, 163, 139, 148, 154, 137], 128.013),
        ([142, 136, 121, 131, 126, 128, 127, 115, 111], 128.311),
        ([230, 189, 140, 205, 186, 148, 175, 165, 139], 128.671),
        ([143, 127, 100, 164, 154, 133, 144, 147, 129], 128.577),
    ],
    "sd1-img2img-ddim": [
        ([100, 104, 96, 102, 88, 86, 92, 101, 110], 128.07),
        ([30, 36, 97, 2, 1, 57, 52, 63, 78], 128.13),
    ],
    "sd1-img2img-reference": [
        ([85, 118, 98, 108, 127, 126, 103, 128, 128], 128.416),
        ([128, 146, 128, 122, 127, 111, 116, 113, 107], 128.76),
    ],
    "sd2v-img2img-euler": [([106, 106, 94, 124, 123, 112, 101, 113, 117], 127.599)],
    "sd2v-img2img-dpm": [([81, 80, 84, 98, 84, 88, 90, 87, 104], 128.74)],
    "x4-untiled": [([91, 108, 127, 117, 141, 164, 135, 142, 150], 114.781)],
    "x4-tiled": [
        ([164, 144, 136, 104, 118, 108, 124, 106, 106], 114.772),
        ([114, 109, 105, 115, 123, 118, 156, 135, 127], 114.65),
    ],
    "x4-reference": [
        ([86, 82, 120, 124, 131, 162, 143, 134, 154], 114.255),
        ([86, 82, 120, 124, 131, 162, 143, 134, 154], 114.255),
    ],
    "sd1-low-vram": [([179, 171, 130, 168, 160, 139, 148, 152, 138], 128.179)],
}


@pytest.fixture(scope="session")
def vivid(tmp_path_factory):
    """Tiny checkpoints at full decoder contrast (the default tiny ones are kept near mid-grey)."""
    from sdgen.testing.ldm_layout import write_tiny

    root = tmp_path_factory.mktemp("vivid")
    return {
        family: write_tiny(family, root / family, "safetensors", seed=1, contrast=1.0)[0]
        for family in ("sd1", "sd2v", "x4")
    }


def _fill(arg: str, inputs: dict) -> str:
    return str(inputs[arg[1:-1]]) if arg.startswith("{") else arg


def _summary(path) -> tuple[list[int], float]:
    img = pixels(path)
    return img[-3:, -3:, 2].flatten().tolist(), round(float(img.astype(np.float64).mean()), 3)


@pytest.mark.parametrize("name", list(CASES))
def test_golden(sdgen, vivid, tmp_path, name):
    family, args = CASES[name]
    inputs = {
        "init": gradient_image(tmp_path / "init.png", 64, 48),
        "small": gradient_image(tmp_path / "s.png", 24, 16),
        "large": gradient_image(tmp_path / "l.png", 48, 40),
    }
    run = sdgen(*[_fill(a, inputs) for a in args], "--ckpt", vivid[family], "--outdir", tmp_path / "out")
    assert run.code == 0, run
    got = [_summary(p) for p in run.paths]
    if RECORD:
        known = json.loads(open(RECORD).read()) if os.path.exists(RECORD) else {}
        known[name] = got
        with open(RECORD, "w") as f:
            json.dump(known, f, indent=0)
        return
    expected = GOLDEN[name]
    assert len(got) == len(expected), (name, got)
    for (got_slice, got_mean), (want_slice, want_mean) in zip(got, expected, strict=True):
        assert np.abs(np.array(got_slice) - np.array(want_slice)).max() <= 1, (name, got_slice, want_slice)
        assert abs(got_mean - want_mean) <= 0.01, (name, got_mean, want_mean)
    if name == "sd1-low-vram":
        meta = json.loads(Image.open(run.paths[0]).info["sdgen"])
        assert meta["memory"] == "sequential CPU offload"
