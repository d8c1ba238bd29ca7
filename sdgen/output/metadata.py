"""What each PNG says about how it was made: an A1111-style ``parameters`` text chunk (which A1111, ComfyUI
and civitai read) and an ``sdgen`` JSON chunk with everything, including the whole spec for ``rerun``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from PIL.PngImagePlugin import PngInfo

from sdgen import __version__
from sdgen.samplers import SAMPLERS

if TYPE_CHECKING:
    from sdgen.model import LoadedModel
    from sdgen.specs import GenerationSpec


def run_metadata(model: LoadedModel, spec: GenerationSpec, scale: float) -> dict[str, Any]:
    """The fields every image of a run shares."""
    return {
        "mode": spec.mode,
        "negative_prompt": spec.negative_prompt,
        "steps": spec.steps,
        "sampler": spec.sampler,
        "sampler_label": SAMPLERS[spec.sampler].label,
        "scale": scale,
        "eta": spec.eta,
        "seed_mode": spec.seed_mode,
        "base_seed": spec.seed,
        "fixed_code": spec.fixed_code,
        "model": model.name,
        "model_hash": model.hash,
        "config": model.config_source,
        "family": model.family.name,
        "v_prediction": model.v_prediction,
        "device": model.placement.device,
        "precision": model.placement.precision,
        "sdgen_version": __version__,
        "spec": spec.to_dict(),
    }


def parameters_text(meta: dict[str, Any]) -> str:
    fields = [
        ("Steps", meta["steps"]),
        ("Sampler", meta["sampler_label"]),
        ("CFG scale", meta["scale"]),
        ("Seed", meta["seed"]),
        ("Size", f"{meta['width']}x{meta['height']}"),
        ("Model hash", meta.get("model_hash")),
        ("Model", meta.get("model")),
        ("Denoising strength", meta.get("strength")),
        ("Noise level", meta.get("noise_level")),
        ("Eta", meta.get("eta") or None),
        ("Version", f"sdgen {__version__}"),
    ]
    lines = [meta["prompt"]]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def png_info(meta: dict[str, Any]) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", parameters_text(meta))
    info.add_text("sdgen", json.dumps(meta, sort_keys=True))
    return info
