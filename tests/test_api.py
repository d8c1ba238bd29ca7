"""The public Python API: load a model once, run specs on it, hear events, cancel; specs as JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import gradient_image, pixels
from PIL import Image

import sdgen
from sdgen.errors import UsageError
from sdgen.events import Finished, Loaded, Notice, Saved, Started, Step, Stopped

SMALL = {"height": 64, "width": 64, "steps": 3}


@pytest.fixture(scope="module")
def model(tiny):
    return sdgen.load_model(sdgen.LoadSpec(ckpt=tiny["sd1.safetensors"], device="cpu"))


def test_one_model_many_runs_with_events(model, tiny, tmp_path):
    events: list = []
    loaded = sdgen.load_model(sdgen.LoadSpec(ckpt=tiny["sd1.safetensors"], device="cpu"), sink=events.append)
    assert isinstance(events[-1], Loaded) and "SD 1.x" in events[-1].description
    events.clear()
    spec = sdgen.GenerationSpec(prompts=("a cat",), seed=5, n_samples=2, **SMALL)
    result = sdgen.run(loaded, spec, sdgen.OutputSpec(outdir=tmp_path / "a"), sink=events.append)
    kinds = [type(e) for e in events]
    assert kinds[0] is Started and kinds[-1] is Finished
    steps = [e for e in events if isinstance(e, Step)]
    assert [s.i for s in steps] == [1, 2, 3] and steps[0].n == 3 and steps[0].latents.shape == (2, 4, 8, 8)
    saved = [e.path for e in events if isinstance(e, Saved)]
    assert saved == result.paths and [p.name for p in saved] == ["00000.png", "00001.png", "grid-0000.png"]
    assert all(p.is_file() for p in saved) and result.images == 2
    # the same loaded model runs another mode next
    init = gradient_image(tmp_path / "init.png", 64, 64)
    spec2 = sdgen.GenerationSpec(
        prompts=("a dog",), mode="img2img", seed=1, steps=4, img2img=sdgen.Img2ImgInput(init_image=init, strength=0.5)
    )
    again = sdgen.run(loaded, spec2, sdgen.OutputSpec(outdir=tmp_path / "b"))
    assert pixels(again.paths[0]).shape == (64, 64, 3)


def test_cancel_stops_within_a_step_and_keeps_earlier_images(model, tmp_path):
    token = sdgen.CancelToken()
    seen: list = []

    def sink(event):
        seen.append(event)
        if isinstance(event, Step) and event.batch == 1 and event.i == 2:
            token.cancel()

    spec = sdgen.GenerationSpec(prompts=("a cat",), seed=1, n_iter=3, **SMALL)
    with pytest.raises(sdgen.Cancelled):
        sdgen.run(model, spec, sdgen.OutputSpec(outdir=tmp_path, skip_grid=True), sink=sink, cancel=token)
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["00000.png"]
    last_step = [e for e in seen if isinstance(e, Step)][-1]
    assert last_step.batch == 1 and last_step.i == 2  # nothing ran after it
    stopped = seen[-1]
    assert isinstance(stopped, Stopped) and stopped.reason == "cancelled" and stopped.images == 1
    assert [p.name for p in stopped.paths] == ["00000.png"]


def test_a_runs_notes_do_not_reach_the_next_run(tiny, tmp_path, monkeypatch):
    """Run 1 overflows in bf16 and moves the UNet to fp32 (noted in its PNG); run 2 on the same model has no
    note of it, but its PNG says the UNet is fp32 now."""
    from sdgen.nets.unet import UNet

    original = UNet.forward

    def overflowing(self, sample, *args, **kwargs):
        out = original(self, sample, *args, **kwargs)
        return (out[0] * float("inf"),) if self.dtype != torch.float32 else out

    monkeypatch.setattr(UNet, "forward", overflowing)
    bf16 = sdgen.load_model(sdgen.LoadSpec(ckpt=tiny["sd1.safetensors"], device="cpu", precision="bf16"))
    notices: list = []
    spec = sdgen.GenerationSpec(prompts=("x",), seed=1, **SMALL)
    first = sdgen.run(bf16, spec, sdgen.OutputSpec(outdir=tmp_path / "1"), sink=notices.append)
    second = sdgen.run(bf16, spec, sdgen.OutputSpec(outdir=tmp_path / "2"))
    meta1 = json.loads(Image.open(first.paths[0]).info["sdgen"])
    meta2 = json.loads(Image.open(second.paths[0]).info["sdgen"])
    assert meta1["notes"] == ["UNet ran in fp32 after a half-precision overflow"]
    assert any(isinstance(e, Notice) and "overflowed in bf16" in e.message for e in notices)
    assert meta2["notes"] == [] and meta2["unet_precision"] == "fp32" and meta2["precision"] == "bf16"


def test_spec_json_round_trip_and_replay_from_the_png(model, tmp_path):
    init = gradient_image(tmp_path / "init.png", 64, 64)
    spec = sdgen.GenerationSpec(
        prompts=("a bird",),
        mode="img2img",
        seed=9,
        steps=4,
        negative_prompt="blurry",
        img2img=sdgen.Img2ImgInput(init_image=init, strength=0.6),
    )
    assert sdgen.GenerationSpec.from_json(spec.to_json()) == spec
    load = sdgen.LoadSpec(ckpt=tmp_path / "init.png", precision="full")
    assert sdgen.LoadSpec.from_json(load.to_json()) == load and load.precision == "fp32"
    out = sdgen.OutputSpec(outdir=tmp_path / "o")
    assert sdgen.OutputSpec.from_json(out.to_json()) == out
    first = sdgen.run(model, spec, out).paths[0]
    recorded = sdgen.GenerationSpec.from_dict(json.loads(Image.open(first).info["sdgen"])["spec"])
    assert recorded == spec
    again = sdgen.run(model, recorded, out).paths[0]
    assert np.array_equal(pixels(first), pixels(again))


def test_random_seed_is_fixed_when_the_spec_is_made():
    spec = sdgen.GenerationSpec(prompts=("x",))
    assert 0 <= spec.seed <= 2**32 - 1
    assert sdgen.GenerationSpec.from_json(spec.to_json()).seed == spec.seed


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"steps": 0}, "--steps 0"),
        ({"mode": "paint"}, "mode 'paint'"),
        ({"mode": "img2img"}, "init image"),
        ({"sampler": "euler", "eta": 0.5}, "only the ddim sampler"),
        ({"n_iter": 0}, "--n_iter 0"),
        ({"prompts": ()}, "no prompt"),
    ],
)
def test_specs_reject_bad_values_when_made(fields, needle):
    with pytest.raises(UsageError, match=needle):
        sdgen.GenerationSpec(**{"prompts": ("x",), **fields})


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"prompts": "a cat"}, "prompts: expected a list"),
        ({"steps": 4.5}, "steps: expected int"),
        ({"seed": "5"}, "seed: expected int"),
        ({"n_samples": True}, "n_samples: expected int"),
    ],
)
def test_specs_check_field_types(fields, needle):
    """A spec from JSON or a caller's code: a wrong type is a UsageError when made, not a TypeError later."""
    with pytest.raises(UsageError, match=needle):
        sdgen.GenerationSpec(**{"prompts": ("x",), **fields})
    with pytest.raises(UsageError, match=needle):
        sdgen.GenerationSpec.from_json(json.dumps({"prompts": ["x"], **fields}))


def test_unknown_json_field_is_refused():
    with pytest.raises(UsageError, match="unknown field"):
        sdgen.GenerationSpec.from_dict({"prompts": ["x"], "stpes": 3})


def test_a_model_refuses_a_mode_of_another_family(model, tmp_path):
    src = gradient_image(tmp_path / "a.png", 32, 32)
    spec = sdgen.GenerationSpec(prompts=("",), mode="upscale", upscale=sdgen.UpscaleInput(images=(src,)))
    with pytest.raises(sdgen.SdgenError, match="cannot run upscale"):
        sdgen.run(model, spec, sdgen.OutputSpec(outdir=tmp_path))


def test_importing_sdgen_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, sdgen; sdgen.GenerationSpec; sdgen.LoadSpec; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
