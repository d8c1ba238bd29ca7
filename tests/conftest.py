"""Shared fixtures: tiny checkpoints built once per session, no network, user dirs moved to tmp."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from sdgen.cli import cli
from sdgen.testing.ldm_layout import write_tiny

NETWORK_ATTEMPTS: list[str] = []


def _refuse(*args, **kwargs):
    NETWORK_ATTEMPTS.append(repr(args[:2]))
    raise OSError("network blocked in sdgen's tests")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, request):
    """Any connection or name lookup fails loudly and is recorded; after every test, none may have happened
    (unless the test is marked tries_network: the default-model download)."""
    NETWORK_ATTEMPTS.clear()
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    yield NETWORK_ATTEMPTS
    if request.node.get_closest_marker("tries_network") is None:
        assert NETWORK_ATTEMPTS == [], f"the test tried to reach the network: {NETWORK_ATTEMPTS}"


@pytest.fixture(autouse=True)
def user_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight checkpoints in the original layout, each with NAME.yaml beside it."""
    root = tmp_path_factory.mktemp("tiny")
    paths: dict[str, Path] = {}
    for family, fmt in (
        ("sd1", "ckpt"),
        ("sd1", "safetensors"),
        ("sd2", "safetensors"),
        ("sd2v", "ckpt"),
        ("x4", "safetensors"),
    ):
        folder = root / f"{family}-{fmt}"
        ckpt, cfg = write_tiny(family, folder, fmt)
        paths[f"{family}.{fmt}"] = ckpt
        paths[f"{family}.yaml"] = cfg
    return paths


def save_as_diffusers(ckpt: Path, folder: Path) -> Path:
    """Write the model in ``ckpt`` as a diffusers folder (unet, vae, text_encoder, scheduler), converted by
    diffusers' own single-file conversion (sdgen.checkpoints.build), not by sdgen's loader."""
    import json

    from sdgen.api import load_model
    from sdgen.checkpoints import build
    from sdgen.checkpoints.files import read_state_dict
    from sdgen.checkpoints.ldm_config import resolve
    from sdgen.checkpoints.load import sibling_yaml
    from sdgen.specs import LoadSpec

    pipe = load_model(LoadSpec(ckpt=ckpt, device="cpu"))
    sd = read_state_dict(ckpt)
    arch = resolve(sd, ckpt, sibling_yaml(ckpt), None)
    build.build_unet(arch, sd, str(ckpt)).save_pretrained(folder / "unet")
    build.build_vae(arch, sd, str(ckpt)).save_pretrained(folder / "vae")
    build.build_text_encoder(arch, sd, str(ckpt)).save_pretrained(folder / "text_encoder")
    s = pipe.schedule
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            {
                "_class_name": "DDIMScheduler",
                "beta_start": s.linear_start,
                "beta_end": s.linear_end,
                "num_train_timesteps": s.timesteps,
                "prediction_type": "v_prediction" if pipe.v_prediction else "epsilon",
            }
        )
    )
    if pipe.low_res_schedule is not None:
        (folder / "low_res_scheduler").mkdir()
        (folder / "low_res_scheduler" / "scheduler_config.json").write_text(
            json.dumps(
                {
                    "_class_name": "DDPMScheduler",
                    "beta_start": pipe.low_res_schedule.linear_start,
                    "beta_end": pipe.low_res_schedule.linear_end,
                }
            )
        )
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture(scope="session")
def tiny_diffusers(tiny, tmp_path_factory) -> Path:
    """A diffusers folder holding the same tiny SD 1.x model (saved from sdgen's own conversion)."""
    return save_as_diffusers(tiny["sd1.safetensors"], tmp_path_factory.mktemp("diffusers") / "tiny-sd1-diffusers")


class Run:
    def __init__(self, result):
        self.result = result
        self.code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr

    @property
    def paths(self) -> list[Path]:
        return [Path(line) for line in self.stdout.splitlines() if line.strip()]

    def __repr__(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


@pytest.fixture
def sdgen():
    """Run the CLI in-process as a user would type it: sdgen("txt2img", "a cat", "--ckpt", ...)."""

    def run(*args: str | Path) -> Run:
        return Run(CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False))

    return run


def pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def gradient_image(path: Path, width: int, height: int, mode: str = "RGB") -> Path:
    """A smooth test picture (no seams of its own), saved in any Pillow mode."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, (x + y) / 2], -1).astype(np.uint8)
    Image.fromarray(rgb).convert(mode).save(path)
    return path
