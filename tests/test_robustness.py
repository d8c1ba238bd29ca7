"""Hostile checkpoints, broken files, out of memory, overflows, interrupts, full disks, races."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pixels
from PIL import Image
from test_errors import assert_one_line_error

from sdgen.checkpoints.files import read_state_dict

SMALL = ("-H", "64", "-W", "64", "--steps", "2")


# ---- 1. hostile pickles -------------------------------------------------------------------------------


class _Reduce:
    """An object that pickles as a call of ``func(*args)``: what a malicious checkpoint contains."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, object]:
    import builtins
    import subprocess as sp

    touch = f"open({str(marker)!r}, 'w').write('ran')"
    return {
        "os.system": _Reduce(os.system, (f"touch {marker}",)),
        "eval": _Reduce(builtins.eval, (touch,)),
        "exec": _Reduce(builtins.exec, (touch,)),
        "subprocess": _Reduce(sp.call, (["touch", str(marker)],)),
        "getattr-chain": _Reduce(getattr, (_Reduce(builtins.__import__, ("os",)), "system")),
        "os.remove": _Reduce(os.remove, (str(marker),)),
    }


def _unknown_module_pickle() -> bytes:
    # GLOBAL 'evil_module_xyz run' then an empty-tuple call: an import of a module that does not exist
    return b"\x80\x02cevil_module_xyz\nrun\nq\x00)Rq\x01."


@pytest.mark.parametrize("name", ["os.system", "eval", "exec", "subprocess", "getattr-chain", "os.remove"])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_malicious_ckpt_is_refused_and_nothing_runs(sdgen, tmp_path, name, layout):
    marker = tmp_path / "marker"
    if name == "os.remove":
        marker.write_text("must survive")
    payload = _payloads(marker)[name]
    ckpt = tmp_path / "model.ckpt"
    obj = {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "x": payload}
    torch.save(obj, ckpt, _use_new_zipfile_serialization=(layout == "zip"))
    run = sdgen("txt2img", "x", "--ckpt", ckpt, *SMALL)
    assert_one_line_error(run, 1, "model.ckpt", "refused", "safetensors")
    if name == "os.remove":
        assert marker.read_text() == "must survive"
    else:
        assert not marker.exists()


def test_raw_pickle_importing_unknown_module_is_refused(sdgen, tmp_path):
    ckpt = tmp_path / "raw.ckpt"
    ckpt.write_bytes(_unknown_module_pickle())
    run = sdgen("txt2img", "x", "--ckpt", ckpt, *SMALL)
    assert run.code == 1 and "Traceback" not in run.stderr
    assert "raw.ckpt" in run.stderr
    assert "evil_module_xyz" not in sys.modules


def test_malicious_tensor_payload_inside_state_dict(sdgen, tmp_path):
    """The call hides inside the state dict, after real tensors: still refused before anything runs."""
    marker = tmp_path / "marker"
    sd = {f"w{i}": torch.zeros(4) for i in range(5)}
    sd["zzz"] = _payloads(marker)["os.system"]
    ckpt = tmp_path / "hidden.ckpt"
    torch.save({"state_dict": sd}, ckpt)
    assert_one_line_error(sdgen("txt2img", "x", "--ckpt", ckpt, *SMALL), 1, "refused")
    assert not marker.exists()


# ---- 2. broken files ----------------------------------------------------------------------------------


def _header(tensors: dict, data: bytes) -> bytes:
    head = json.dumps(tensors).encode()
    return struct.pack("<Q", len(head)) + head + data


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("zero.safetensors", b"", "empty"),
        ("short.safetensors", b"\x01\x00", "not a checkpoint"),
        ("huge-header.safetensors", struct.pack("<Q", 10**12) + b"{}", "header length"),
        ("not-json.safetensors", struct.pack("<Q", 4) + b"{abc", "not valid JSON"),
        (
            "lying-size.safetensors",
            _header({"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 16),
            "outside",
        ),
        (
            "lying-shape.safetensors",
            _header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16),
            "bytes stored",
        ),
        (
            "overlap.safetensors",
            _header(
                {
                    "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
                },
                b"\0" * 24,
            ),
            "overlap",
        ),
        (
            "bad-dtype.safetensors",
            _header({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "unknown dtype",
        ),
    ],
)
def test_broken_safetensors(sdgen, tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    run = sdgen("txt2img", "x", "--ckpt", path, *SMALL, "--outdir", tmp_path / "out")
    assert_one_line_error(run, 1, name, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_checkpoints(sdgen, tiny, tmp_path, fraction):
    for key in ("sd1.ckpt", "sd1.safetensors"):
        data = tiny[key].read_bytes()
        cut = tmp_path / f"cut-{tiny[key].name}"
        cut.write_bytes(data[: int(len(data) * fraction)])
        run = sdgen("txt2img", "x", "--ckpt", cut, *SMALL, "--outdir", tmp_path / "out")
        assert_one_line_error(run, 1, cut.name)
        assert "damaged" in run.stderr or "truncated" in run.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoint_missing_half_its_keys(sdgen, tiny, tmp_path):
    from safetensors.torch import save_file

    sd = read_state_dict(tiny["sd1.safetensors"])
    unet_keys = sorted(k for k in sd if k.startswith("model.diffusion_model."))
    for k in unet_keys[::2]:
        del sd[k]
    path = tmp_path / "half.safetensors"
    save_file(sd, str(path))
    run = sdgen("txt2img", "x", "--ckpt", path, "--config", tiny["sd1.yaml"], *SMALL)
    assert_one_line_error(run, 1, "half.safetensors", "UNet")


def test_unreadable_init_image_and_prompt_file_folder(sdgen, tiny, tmp_path):
    run = sdgen("txt2img", "--from-file", tmp_path, "--ckpt", tiny["sd1.safetensors"], *SMALL)
    assert_one_line_error(run, 1, "--from-file", "folder")
    run = sdgen("img2img", "x", "--init-img", tmp_path, "--ckpt", tiny["sd1.safetensors"], *SMALL)
    assert_one_line_error(run, 1, "--init-img", "folder")


# ---- 4. out of memory ---------------------------------------------------------------------------------


def _inject(monkeypatch, cls, method: str, fail_when):
    original = getattr(cls, method)
    calls = {"n": 0}

    def wrapped(self, *args, **kwargs):
        calls["n"] += 1
        if fail_when(calls["n"], self):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapped)
    return calls


def test_unet_oom_steps_down_the_ladder_and_finishes(sdgen, tiny, monkeypatch, tmp_path):
    from sdgen.nets.unet import UNet

    _inject(monkeypatch, UNet, "forward", lambda n, self: n <= 2)
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--seed", "1", "--outdir", tmp_path / "a")
    assert run.code == 0, run
    assert "out of GPU memory; retrying this batch with attention slicing" in run.stderr
    assert "with tiled VAE decode" in run.stderr
    notes = json.loads(Image.open(run.paths[0]).info["sdgen"])["notes"]
    assert "out of memory: used attention slicing" in notes
    # the retried batch used the same random numbers: same image as an undisturbed run
    monkeypatch.undo()
    clean = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--seed", "1", "--outdir", tmp_path / "b")
    assert np.abs(pixels(run.paths[0]).astype(int) - pixels(clean.paths[0])).max() <= 1


def test_vae_oom_is_retried(sdgen, tiny, monkeypatch):
    from sdgen.nets.vae import AutoencoderKL

    _inject(monkeypatch, AutoencoderKL, "decode", lambda n, self: n == 1)
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL)
    assert run.code == 0, run
    assert "retrying this batch with attention slicing" in run.stderr


def test_oom_at_the_bottom_keeps_earlier_images_and_says_what_to_try(sdgen, tiny, monkeypatch, tmp_path):
    from sdgen.nets.unet import UNet

    _inject(monkeypatch, UNet, "forward", lambda n, self: n > 2)  # batch 1 has 2 UNet calls
    run = sdgen(
        "txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--n_iter", "3", "--skip_grid", "--outdir", tmp_path
    )
    assert run.code == 1
    assert "Error: out of GPU memory even with sequential CPU offload" in run.stderr
    assert "-H/-W" in run.stderr and "Traceback" not in run.stderr
    saved = sorted((tmp_path / "samples").glob("*.png"))
    assert [p.name for p in saved] == ["00000.png"]
    Image.open(saved[0]).load()


def test_low_vram_starts_at_the_bottom(sdgen, tiny):
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--low-vram")
    assert run.code == 0, run


def test_per_layer_offload_hooks_change_no_numbers_and_keep_an_upcast(tiny):
    """The hooks of the last rung (each layer's weights swapped in for its call), run with the CPU standing in
    for the GPU: same outputs as without them, and the UNet's fp32 upcast after an overflow is not undone."""
    from sdgen.api import load_model
    from sdgen.conditioning import encode_prompts
    from sdgen.guidance import guided
    from sdgen.runtime import memory
    from sdgen.specs import LoadSpec

    model = load_model(LoadSpec(ckpt=tiny["sd1.safetensors"], device="cpu"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])

    def outputs():
        with torch.no_grad():
            c = encode_prompts(model, ["a cat"], "", 7.5, print)
            return c.cond, guided(model, c, 7.5)(x, t), model.decode(x)

    before = outputs()
    for module in model.memory.models.values():
        memory._layer_offload(module, torch.device("cpu"))
    for a, b in zip(before, outputs(), strict=True):
        assert torch.equal(a, b)
    model.unet.to(torch.float64)  # what upcast does (to fp32 from half; here to a dtype we can tell apart)
    with torch.no_grad():
        guided(model, encode_prompts(model, ["a cat"], "", 1.0, print), 1.0)(x.double(), t)
    assert model.unet.dtype == torch.float64


# ---- 5. overflow in half precision --------------------------------------------------------------------


def test_unet_overflow_in_half_precision_is_redone_in_fp32(sdgen, tiny, monkeypatch):
    from sdgen.nets.unet import UNet

    original = UNet.forward

    def overflowing(self, sample, *args, **kwargs):
        out = original(self, sample, *args, **kwargs)
        if self.dtype != torch.float32:
            out = (out[0] * float("inf"),) if isinstance(out, tuple) else out
        return out

    monkeypatch.setattr(UNet, "forward", overflowing)
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--precision", "bf16")
    assert run.code == 0, run
    assert "overflowed in bf16; redoing this batch with the UNet in fp32" in run.stderr
    img = pixels(run.paths[0])
    assert img.std() > 0.5 and img.max() > 0  # a picture, not black
    notes = json.loads(Image.open(run.paths[0]).info["sdgen"])["notes"]
    assert "UNet ran in fp32 after a half-precision overflow" in notes


def test_vae_overflow_in_half_precision_decodes_in_fp32(sdgen, tiny, monkeypatch):
    from sdgen.nets.vae import AutoencoderKL

    original = AutoencoderKL.decode

    def overflowing(self, z, *args, **kwargs):
        out = original(self, z, *args, **kwargs)
        if self.dtype != torch.float32:
            return (out[0] * float("nan"),)
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", overflowing)
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--precision", "bf16")
    assert run.code == 0, run
    assert "VAE overflowed" in run.stderr
    assert pixels(run.paths[0]).std() > 0.5
    assert (
        "VAE decoded in fp32 after a half-precision overflow"
        in json.loads(Image.open(run.paths[0]).info["sdgen"])["notes"]
    )


def test_nan_even_in_fp32_is_an_error_not_a_black_image(sdgen, tiny, monkeypatch, tmp_path):
    from sdgen.nets.unet import UNet

    original = UNet.forward

    def broken(self, sample, *args, **kwargs):
        out = original(self, sample, *args, **kwargs)
        return (out[0] * float("nan"),)

    monkeypatch.setattr(UNet, "forward", broken)
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--outdir", tmp_path)
    assert_one_line_error(run, 1, "NaN", "broken")
    assert not list(tmp_path.rglob("*.png"))


# ---- 6. interrupts and disks --------------------------------------------------------------------------


def _start(tiny, outdir: Path, n_iter: int = 200) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "sdgen",
        "txt2img",
        "x",
        "--ckpt",
        str(tiny["sd1.safetensors"]),
        *SMALL,
        "--n_iter",
        str(n_iter),
        "--skip_grid",
        "-q",
        "--outdir",
        str(outdir),
        "--seed",
        "1",
    ]
    # As from a terminal: a shell without job control starts background jobs with SIGINT ignored, and a child
    # inherits that (Python then keeps ignoring it), so a test run started with '&' would see no Ctrl-C.
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_batch_stops_cleanly(tiny, tmp_path, sig, code):
    proc = _start(tiny, tmp_path)
    first = proc.stdout.readline()  # the first image is on disk
    assert first.strip().endswith(".png"), proc.stderr.read()
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert "file(s) written before it are complete" in err
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    assert len(pngs) >= 1 and len(pngs) < 200
    for p in pngs:
        Image.open(p).load()  # complete files only
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_disk_full_ends_clearly_without_partial_png(sdgen, tiny, monkeypatch, tmp_path):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--outdir", tmp_path)
    assert_one_line_error(run, 1, "disk is full", str(tmp_path))
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.tmp"))


def test_read_only_output_folder(sdgen, tiny, monkeypatch, tmp_path):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if tmp_path in self.parents or self == tmp_path / "ro":
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--outdir", tmp_path / "ro")
    assert_one_line_error(run, 1, "read-only", "--outdir")


def test_outdir_that_is_a_file(sdgen, tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    run = sdgen("txt2img", "x", "--ckpt", tiny["sd1.safetensors"], *SMALL, "--outdir", tmp_path / "file")
    assert_one_line_error(run, 1, "cannot write", "--outdir")


# ---- 7. concurrency -----------------------------------------------------------------------------------


def test_two_processes_into_one_folder_never_collide(tiny, tmp_path):
    procs = [_start(tiny, tmp_path, n_iter=4) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    printed = [line for out, _ in outs for line in out.split()]
    names = sorted(Path(p).name for p in printed)
    assert names == [f"{i:05d}.png" for i in range(8)]
    for p in (tmp_path / "samples").glob("*.png"):
        Image.open(p).load()
    assert len(list((tmp_path / "samples").iterdir())) == 8


@pytest.mark.parametrize("sig, code, what", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_loading_ends_cleanly(tiny, tmp_path, sig, code, what):
    """A signal while torch and diffusers are still being imported and the checkpoint read: the same one-line
    summary and exit code as mid-run (diffusers' lazy imports catch Exception: the signal must not be one)."""
    proc = _start(tiny, tmp_path)
    # torch is imported only by the load (never by the CLI's start-up): once its library is mapped, main() has
    # installed the handlers and the load is under way (diffusers' imports and the checkpoint read follow)
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert "seed 1 " not in err, "the run had already started: the test did not hit the load"
    assert proc.returncode == code, err
    assert f"sdgen: {what}; 0 file(s) written before it are complete" in err
    assert "Traceback" not in err and "unexpected" not in err


def test_notices_are_printed_above_the_progress_bar_never_on_its_line(capsys):
    import re

    from sdgen.cli import PrintingSink
    from sdgen.events import Finished, Notice, Started, Step

    sink = PrintingSink(quiet=False)
    sink(Started(seed=1, seed_mode="per-image", sampler="ddim", steps=4, evaluations=4, batches=1, images=1))
    sink(Step(i=1, n=4, batch=0))
    sink(Notice("sdgen: a notice in the middle"))
    sink(Step(i=2, n=4, batch=0))
    sink(Finished(images=1, paths=()))
    err = capsys.readouterr().err
    assert "1/4" in err  # the bar was drawn before the notice
    segments = [s for s in re.split(r"[\r\n]", err) if "a notice" in s]
    assert segments == ["sdgen: a notice in the middle"], err
