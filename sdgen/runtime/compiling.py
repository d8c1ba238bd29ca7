"""``--compile``: torch.compile the UNet and the VAE decoder, with a compile cache that outlives the process.

What is compiled: the UNet (after fusing its attention q/k/v projections into one matmul) and the VAE
decoder, each with static shapes and the whole forward in one graph. On CUDA the mode is "reduce-overhead":
CUDA graphs, which replay a step's few hundred kernel launches as one (the recipe diffusers documents;
"max-autotune" adds measured kernel choice at a longer first compile: compare them with bench/bench.py
--compile-mode). On the CPU it is inductor's default mode. Not inductor's weight freezing: torch 2.14 does not
cache frozen graphs, and the cache is worth more than freezing's few percent.

The first run with a given model shape, size and batch compiles (minutes); inductor's FX-graph, AOT-autograd
and autotuning caches live in ``~/.cache/sdgen/torch-compile`` (or a $TORCHINDUCTOR_CACHE_DIR of your own),
so a new process with the same shapes skips most of that work. A different size or batch compiles again
(and is cached too).

The compiled modules are wrapped in :class:`CompiledModule`, which takes the place of the original in the
loaded model, so that the engine and the model never know: under CUDA graphs it marks a new graph step before
each call (each call replays its one recorded graph) and copies the outputs out of the graph's memory pool,
which the next call overwrites (PLMS keeps the last three UNet outputs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sdgen.runtime.cache import cache_dir

if TYPE_CHECKING:
    from sdgen.model import LoadedModel

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_dir() -> Path:
    """$TORCHINDUCTOR_CACHE_DIR if the user chose one, else sdgen's. (Importing torch._dynamo sets the variable
    to inductor's /tmp default, so that value counts as not chosen.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

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


def _copied(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_copied(o) for o in out)
    return out


class CompiledModule(nn.Module):
    """A module and its compiled forward. Attributes other than forward (config, dtype, .to()) are the
    original module's, so it stands in for it anywhere."""

    def __init__(self, module: nn.Module, options: dict[str, Any], cuda_graphs: bool) -> None:
        super().__init__()
        self.inner = module
        object.__setattr__(self, "_compiled", torch.compile(module, **options))  # not a second submodule
        object.__setattr__(self, "_cuda_graphs", cuda_graphs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._cuda_graphs:
            return self._compiled(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        return _copied(self._compiled(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def compile_model(model: LoadedModel, mode: str | None = None) -> str:
    """Put compiled wrappers in place of the model's UNet and VAE decoder. Returns the mode. Nothing is
    compiled until the first call."""
    import logging
    import warnings

    # Not the user's business: dynamo's note that it traces through diffusers' lru_cache'd version check, and
    # inductor's (CPU) note that no CUDA runtime was found for its C++ compiler setup.
    warnings.filterwarnings("ignore", message=r".*functools\.lru_cache.*", category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    use_persistent_cache()
    device_type = model.placement.torch_device.type
    mode = mode or compile_mode(device_type)
    if hasattr(model.unet, "fuse_qkv_projections"):
        model.unet.fuse_qkv_projections()
    options = {"mode": mode, "fullgraph": True, "dynamic": False}
    cuda_graphs = device_type == "cuda" and mode in ("reduce-overhead", "max-autotune")
    model.unet = CompiledModule(model.unet, options, cuda_graphs)
    model.vae.decoder = CompiledModule(model.vae.decoder, options, cuda_graphs)
    model.compiled = mode
    return mode
