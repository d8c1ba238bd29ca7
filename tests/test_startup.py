"""What a run from a single checkpoint file imports: torch and sdgen's own networks, not diffusers or
transformers (seconds of imports before the first step; bench/startup.py measures the whole start-up)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

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


# sdgen's networks: torch, the standard library and these sdgen modules (which import nothing heavy) only
NETWORK_IMPORTS = {
    "sdgen.nets.unet": {"sdgen.errors", "sdgen.nets"},
    "sdgen.nets.vae": {"sdgen.errors"},
    "sdgen.nets.clip": {"sdgen.errors", "sdgen.nets", "sdgen.families.base"},
}


@pytest.mark.parametrize("module", list(NETWORK_IMPORTS))
def test_the_networks_import_only_torch_and_the_standard_library(module):
    tree = ast.parse(Path(importlib.import_module(module).__file__).read_text(encoding="utf-8"))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {n.split(".")[0] for n in names} <= set(sys.stdlib_module_names) | {"torch", "sdgen"}, names
    assert {n for n in names if n.startswith("sdgen")} <= NETWORK_IMPORTS[module]
