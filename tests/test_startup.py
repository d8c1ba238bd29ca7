"""What a run from a single checkpoint file imports: torch and sdgen's own networks, not diffusers or
transformers (seconds of imports before the first step; bench/startup.py measures the whole start-up)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import gradient_image

HEAVY = ("diffusers", "transformers", "open_clip", "scipy", "torch._dynamo")


@pytest.mark.parametrize("case", ["txt2img sd1.ckpt", "txt2img sd2v.ckpt", "upscale x4.safetensors"])
def test_a_single_file_run_imports_neither_diffusers_nor_transformers(case, tiny, tmp_path):
    command, name = case.split()
    first = "a cat" if command == "txt2img" else str(gradient_image(tmp_path / "in.png", 32, 32))
    args = [command, first, "--ckpt", str(tiny[name]), "--steps", "2", "--outdir", str(tmp_path), "--device", "cpu"]
    if command == "txt2img":
        args += ["-H", "64", "-W", "64"]
    code = (
        "import sys\nfrom sdgen.cli import cli\n"
        f"try:\n    cli({args!r}, prog_name='sdgen')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        f"print('IMPORTED', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(tmp_path.rglob("*.png")), out.stderr[-2000:]
    assert "IMPORTED []" in out.stdout, out.stdout
