"""``--compile``: torch.compile the UNet and the VAE decoder, with a compile cache that outlives the process.

What is compiled: the UNet (after fusing its attention q/k/v projections into one matmul) and the VAE
decoder, each with static shapes and the whole forward in one graph. On CUDA the mode is "reduce-overhead":
CUDA graphs, which replay a step's few hundred kernel launches as one (the recipe diffusers documents;
"max-autotune" adds measured kernel choice at a longer first compile: compare them with bench/bench.py
--compile-mode). On the CPU it is inductor's default mode. Not inductor's weight freezing: torch 2.14 does not cache
frozen graphs, and the cache is worth more than freezing's few percent.

The first run with a given model shape, size and batch compiles (minutes); inductor's FX-graph, AOT-autograd
and autotuning caches live in ``~/.cache/sdgen/torch-compile`` (or a $TORCHINDUCTOR_CACHE_DIR of your own), so a
new process with the same shapes skips most of that work. A different size or batch compiles again (and is
cached too).

CUDA graphs reuse their output buffers: a compiled UNet call's output is overwritten by the next call, so
:func:`unet_output` copies it out before the sampler keeps it (PLMS keeps the last three).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdgen.pipeline import Pipeline

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_dir() -> Path:
    """$TORCHINDUCTOR_CACHE_DIR if the user chose one, else sdgen's. (Importing torch._dynamo sets the variable
    to inductor's /tmp default, so that value counts as not chosen.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from sdgen.loader import cache_dir

    chosen = os.environ.get(CACHE_ENV)
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    return cache_dir() / "torch-compile"


def use_persistent_cache() -> Path:
    """Point inductor's on-disk caches at sdgen's cache folder (its default is /tmp, lost at reboot) and make
    sure the FX-graph and AOT-autograd caches are on. Call before the first compile."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(folder)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder


def compile_mode(device_type: str) -> str:
    return "reduce-overhead" if device_type == "cuda" else "default"


def compile_pipeline(pipe: Pipeline, mode: str | None = None) -> str:
    """Replace the pipeline's UNet by its compiled wrapper and compile the VAE decoder in place. Returns the
    mode. Nothing is compiled until the first call."""
    import logging
    import warnings

    import torch

    # Not the user's business: dynamo's note that it traces through diffusers' lru_cache'd version check, and
    # inductor's (CPU) note that no CUDA runtime was found for its C++ compiler setup.
    warnings.filterwarnings("ignore", message=r".*functools\.lru_cache.*", category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    use_persistent_cache()
    device_type = pipe.placement.torch_device.type
    mode = mode or compile_mode(device_type)
    unet = pipe.unet
    if hasattr(unet, "fuse_qkv_projections"):
        unet.fuse_qkv_projections()
    options = {"mode": mode, "fullgraph": True, "dynamic": False}
    pipe.unet = torch.compile(unet, **options)
    pipe.vae.decoder = torch.compile(pipe.vae.decoder, **options)
    pipe.cuda_graphs = device_type == "cuda" and mode in ("reduce-overhead", "max-autotune")
    pipe.notes.append(f"compiled ({mode})")
    return mode


def before_compiled_call(pipe: Pipeline) -> None:
    """Under CUDA graphs: tell the graph trees that a new step begins, so that each UNet or VAE call replays
    its one recorded graph instead of recording a chain of new ones (outputs of earlier calls may be
    overwritten from here on; :func:`unet_output` has already copied what the sampler keeps)."""
    if pipe.cuda_graphs:
        import torch

        torch.compiler.cudagraph_mark_step_begin()


def unet_output(pipe: Pipeline, out):
    """The UNet's output as float32, in memory the next call will not overwrite."""
    import torch

    if pipe.cuda_graphs and out.dtype == torch.float32:
        return out.clone()  # .float() of an fp32 tensor is the same tensor: copy it out of the graph's pool
    return out.float()
