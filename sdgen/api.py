"""The public Python API: load a model once, run specs on it, receive events, cancel.

    from pathlib import Path
    import sdgen

    model = sdgen.load_model(sdgen.LoadSpec(ckpt=Path("v1-5-pruned-emaonly.safetensors")))
    spec = sdgen.GenerationSpec(prompts=("a lighthouse at dusk",), steps=30, seed=42)
    result = sdgen.run(model, spec, sdgen.OutputSpec(outdir=Path("out")), sink=print)
    print(result.paths)

The CLI is this API's first client.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from sdgen.events import CancelToken, Notice, Sink, ignore
from sdgen.specs import GenerationSpec, LoadSpec, OutputSpec

if TYPE_CHECKING:  # torch is imported by the first load, not by `import sdgen.api`
    from sdgen.engine import RunResult
    from sdgen.model import LoadedModel


def load_model(spec: LoadSpec, modes: tuple[str, ...] | None = None, sink: Sink = ignore) -> LoadedModel:
    """Load the checkpoint ``spec`` names (``modes``: refuse a model that serves none of these modes).
    Without a ckpt, the default model is found (or refused, offline) before torch is imported."""
    if spec.ckpt is None:
        from sdgen.checkpoints.hub import default_checkpoint

        spec = dataclasses.replace(spec, ckpt=default_checkpoint(lambda m: sink(Notice(m))))
    from sdgen.checkpoints.load import load_model as load

    return load(spec, modes, sink)


def run(
    model: LoadedModel, spec: GenerationSpec, output: OutputSpec, sink: Sink = ignore, cancel: CancelToken | None = None
) -> RunResult:
    """Make and write the images of ``spec``; ``sink`` hears every event; ``cancel`` stops it between steps."""
    from sdgen.engine import run as run_engine

    return run_engine(model, spec, output, sink, cancel)
