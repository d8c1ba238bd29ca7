"""Turn a :class:`LoadSpec` (a single file, a diffusers folder, or nothing) into a ready :class:`LoadedModel`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdgen.checkpoints.hashing import ModelHash
from sdgen.checkpoints.ldm_config import resolve
from sdgen.errors import CheckpointError
from sdgen.events import Loaded, Notice, Sink, ignore
from sdgen.families import FAMILIES, Family, detect_diffusers
from sdgen.model import LoadedModel
from sdgen.runtime.device import Placement, choose, tune_cpu_allocator
from sdgen.samplers.schedule import X4_LOW_RES_SCHEDULE, Schedule
from sdgen.specs import LoadSpec


def sibling_yaml(ckpt: Path) -> Path | None:
    """``model.yaml`` beside ``model.ckpt``: the convention other SD tools use for a model's own config."""
    candidate = ckpt.with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def quiet_libraries() -> None:
    """diffusers/transformers log advice meant for their own loaders (e.g. 'keep modules in float32'
    for models that have none); sdgen says what matters itself."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_model(spec: LoadSpec, modes: tuple[str, ...] | None = None, sink: Sink = ignore) -> LoadedModel:
    """Load the model ``spec`` names (a path: sdgen.api.load_model finds the default model first).
    ``modes``: the generation modes the caller will run (a model of a family that serves none of them is
    refused before its weights are built)."""
    ckpt = spec.ckpt
    if ckpt is None:
        raise ValueError("checkpoints.load.load_model needs spec.ckpt; sdgen.api.load_model finds the default")
    placement = choose(spec.device, spec.precision)
    families = tuple(f for f in FAMILIES if modes is None or set(modes) & set(f.modes))
    if ckpt.is_dir():
        model = _load_diffusers_folder(ckpt, placement, spec, families)
    else:
        model = _load_single_file(ckpt, placement, spec, families)
    if spec.low_vram:
        from sdgen.runtime.memory import BOTTOM, MemoryPlan

        model.memory = MemoryPlan(model.memory.models, placement.torch_device, level=BOTTOM)
    if spec.compile:
        from sdgen.runtime.compiling import compile_cache_dir, compile_model

        mode = compile_model(model)
        sink(
            Notice(
                f"sdgen: --compile ({mode}): the first run of a size and batch compiles for minutes; the "
                f"compile cache is {compile_cache_dir()}",
                informational=True,
            )
        )
    sink(Loaded(model=ckpt.name, description=model.describe(), compiled=model.compiled))
    return model


def _check_family(family: Family, families: tuple[Family, ...], ckpt: Path) -> None:
    if family not in families:
        wanted = " or ".join(f.label for f in families)
        hint = " or ".join(f"'sdgen {m}'" for m in family.modes)
        raise CheckpointError(f"--ckpt {ckpt}: a {family.label} model; this command needs {wanted} (use {hint})")


def _place(parts: dict[str, Any], family: Family, placement: Placement, low_vram: bool) -> None:
    """A diffusers folder's modules: cast to the run's dtype; move to the device unless --low-vram keeps the
    weights on the CPU (single files are placed tensor by tensor as they load: sdgen.checkpoints.nets).
    Half-precision runs also take the channels-last layout for the convolutional models (17% faster per
    UNet call in bf16 on an AMX CPU); fp32 keeps the default layout, whose numerics match the reference."""
    import torch

    device = "cpu" if low_vram else placement.torch_device
    half = placement.precision != "fp32"
    for name, module in parts.items():
        dtype = torch.float32 if name == "vae" and family.vae_fp32 else placement.dtype
        last = name == "unet" and half or name == "vae" and (half or placement.device == "cpu")  # as nets.build_parts
        layout = {"memory_format": torch.channels_last} if last else {}
        # one pass per weight: cast, move and re-layout together (the x4 VAE is not cast to half and back)
        module.to(device, dtype, **layout)
    if placement.device == "cpu":
        tune_cpu_allocator()


def _assemble(family: Family, parts: dict[str, Any], placement: Placement, **fields: Any) -> LoadedModel:
    from sdgen.runtime.memory import MemoryPlan

    memory = MemoryPlan(dict(parts), placement.torch_device)
    return LoadedModel(
        family=family,
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        placement=placement,
        memory=memory,
        **fields,
    )


def _load_single_file(ckpt: Path, placement: Placement, spec: LoadSpec, families: tuple[Family, ...]) -> LoadedModel:
    from sdgen.checkpoints.files import read_state_dict
    from sdgen.checkpoints.nets import build_parts

    sd = read_state_dict(ckpt)  # mapped, not read
    arch = resolve(sd, ckpt, spec.config or sibling_yaml(ckpt), spec.v_prediction)
    _check_family(arch.family, families, ckpt)
    model_hash = ModelHash(ckpt)  # in the background while the weights load, unless cached
    parts = build_parts(arch, sd, str(ckpt), placement, spec.low_vram)
    del sd
    if placement.device == "cpu":
        tune_cpu_allocator()
    p = arch.params
    low = p.get("low_scale_config", {}).get("params", {}).get("noise_schedule_config")
    d = X4_LOW_RES_SCHEDULE  # the defaults of the reference's low-scale model, too
    low_res = Schedule(low.get("linear_start", d.linear_start), low.get("linear_end", d.linear_end)) if low else None
    return _assemble(
        arch.family,
        parts,
        placement,
        v_prediction=arch.v_prediction,
        low_res_schedule=low_res,
        schedule=Schedule(p.get("linear_start", 0.00085), p.get("linear_end", 0.012), p.get("timesteps", 1000)),
        native_size=arch.native_size,
        name=ckpt.stem,
        hash_source=model_hash,
        config_source=arch.config_source,
    )


def _load_diffusers_folder(
    folder: Path, placement: Placement, spec: LoadSpec, families: tuple[Family, ...]
) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    quiet_libraries()
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"--ckpt {folder}: a folder but not a diffusers model (no model_index.json)")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"--ckpt {folder}: incomplete diffusers folder ({first})") from e
    family = detect_diffusers(unet.config.in_channels, text_encoder.config.hidden_act, f"--ckpt {folder}")
    _check_family(family, families, folder)
    v = sched.get("prediction_type") == "v_prediction" if spec.v_prediction is None else spec.v_prediction
    parts = {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval()}
    _place(parts, family, placement, spec.low_vram)
    schedule = Schedule(
        sched.get("beta_start", 0.00085), sched.get("beta_end", 0.012), sched.get("num_train_timesteps", 1000)
    )
    low_res = None
    low_file = folder / "low_res_scheduler" / "scheduler_config.json"
    if low_file.is_file():
        low_cfg = json.loads(low_file.read_text())
        d = X4_LOW_RES_SCHEDULE
        low_res = Schedule(low_cfg.get("beta_start", d.linear_start), low_cfg.get("beta_end", d.linear_end))
    return _assemble(
        family,
        parts,
        placement,
        v_prediction=v,
        schedule=schedule,
        native_size=int(unet.config.sample_size) * 8,
        name=folder.name,
        hash_source=None,
        config_source="diffusers folder",
        low_res_schedule=low_res,
    )
