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

from sdgen.engine import RunResult
from sdgen.engine import run as _run
from sdgen.events import CancelToken, Sink, ignore
from sdgen.model import LoadedModel
from sdgen.specs import GenerationSpec, LoadSpec, OutputSpec


def load_model(spec: LoadSpec, modes: tuple[str, ...] | None = None, sink: Sink = ignore) -> LoadedModel:
    """Load the checkpoint ``spec`` names (``modes``: refuse a model that serves none of these modes)."""
    from sdgen.checkpoints.load import load_model as load

    return load(spec, modes, sink)


def run(
    model: LoadedModel, spec: GenerationSpec, output: OutputSpec, sink: Sink = ignore, cancel: CancelToken | None = None
) -> RunResult:
    """Make and write the images of ``spec``; ``sink`` hears every event; ``cancel`` stops it between steps."""
    return _run(model, spec, output, sink, cancel)
