"""Turn ``--ckpt`` (a single file, a diffusers folder, or nothing) into a ready :class:`Pipeline`."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from sdgen.device import Placement, choose, tune_cpu_allocator
from sdgen.errors import CheckpointError
from sdgen.families import FAMILY_NAMES, SD1, SD2, X4, resolve_spec
from sdgen.pipeline import Pipeline
from sdgen.request import LoadRequest
from sdgen.samplers import X4_LOW_RES_SCHEDULE, Schedule

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD 1.5, as most tools default to
DEFAULT_FILE = "v1-5-pruned-emaonly.safetensors"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdgen"


def model_hash(path: Path) -> str:
    """A1111's 'Model hash' (the first 10 hex digits of the file's SHA-256), cached by path, size, mtime."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_dir() / "hashes.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        known[key] = h.hexdigest()
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, store)
        except OSError:
            pass  # a read-only cache only costs time next run
    return known[key][:10]


def default_checkpoint() -> Path:
    """SD 1.5 from the Hugging Face cache, downloaded once (with a progress bar) when online."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(DEFAULT_REPO, DEFAULT_FILE, local_files_only=True))
    except Exception:
        pass
    print(f"sdgen: no --ckpt given; downloading {DEFAULT_REPO}/{DEFAULT_FILE} (once)", file=sys.stderr)
    try:
        return Path(hf_hub_download(DEFAULT_REPO, DEFAULT_FILE))
    except Exception as e:
        raise CheckpointError(
            f"no --ckpt given and the default model ({DEFAULT_REPO}/{DEFAULT_FILE}) is not cached and could not "
            f"be downloaded ({type(e).__name__}); pass your checkpoint with --ckpt PATH"
        ) from e


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


def load(req: LoadRequest, expect: tuple[str, ...] = (SD1, SD2), say=print) -> Pipeline:
    placement = choose(req.device, req.precision)
    quiet_libraries()
    ckpt = req.ckpt if req.ckpt is not None else default_checkpoint()
    if ckpt.is_dir():
        pipe = _load_diffusers_folder(ckpt, placement, req, expect)
    else:
        pipe = _load_single_file(ckpt, placement, req, expect)
    if req.low_vram:
        from sdgen.memory import BOTTOM, MemoryPlan

        pipe.memory = MemoryPlan(pipe.memory.models, placement.torch_device, level=BOTTOM)
    kind = "v-prediction" if pipe.v_prediction else "epsilon"
    say(f"sdgen: {FAMILY_NAMES[pipe.family]} ({kind}) from {ckpt.name}, config {pipe.config_source}, "
        f"on {placement.describe()}")
    if req.compile:
        from sdgen.compiling import compile_cache_dir, compile_pipeline

        mode = compile_pipeline(pipe)
        say(f"sdgen: --compile ({mode}): the first run of a size and batch compiles for minutes; the compile "
            f"cache is {compile_cache_dir()}")
    return pipe


def _check_family(family: str, expect: tuple[str, ...], ckpt: Path) -> None:
    if family not in expect:
        wanted = " or ".join(FAMILY_NAMES[f] for f in expect)
        hint = "use 'sdgen upscale'" if family == X4 else "use 'sdgen txt2img' or 'sdgen img2img'"
        raise CheckpointError(f"--ckpt {ckpt}: a {FAMILY_NAMES[family]} model; this command needs {wanted} ({hint})")


def _place(pipe_parts: dict, placement: Placement, low_vram: bool) -> None:
    """Cast to the run's dtype; move to the device unless --low-vram keeps the weights on the CPU.
    Half-precision runs also take the channels-last layout for the convolutional models (17% faster per
    UNet call in bf16 on an AMX CPU); fp32 keeps the default layout, whose numerics match the reference."""
    import torch

    device = "cpu" if low_vram else placement.torch_device
    half = placement.precision != "fp32"
    for name in ("unet", "text_encoder", "vae"):
        dtype = torch.float32 if name == "vae" and pipe_parts.get("vae_fp32") else placement.dtype
        layout = {"memory_format": torch.channels_last} if half and name != "text_encoder" else {}
        # one pass per weight: cast, move and re-layout together (the x4 VAE is not cast to half and back)
        pipe_parts[name].to(device, dtype, **layout)
    if placement.device == "cpu":
        tune_cpu_allocator()


def _load_single_file(ckpt: Path, placement: Placement, req: LoadRequest, expect: tuple[str, ...]) -> Pipeline:
    from sdgen import models
    from sdgen.checkpoint_files import read_state_dict

    sd = read_state_dict(ckpt)
    config_path = req.config or sibling_yaml(ckpt)
    spec = resolve_spec(sd, ckpt, config_path, req.v_prediction)
    _check_family(spec.family, expect, ckpt)
    source = str(ckpt)
    parts = {
        "unet": models.build_unet(spec, sd, source),
        "vae": models.build_vae(spec, sd, source),
    }
    parts["text_encoder"], pad_id = models.build_text_encoder(spec, sd, source)
    parts["vae_fp32"] = spec.family == X4  # the x4 upscaler's VAE overflows in fp16
    del sd
    _place(parts, placement, req.low_vram)
    p = spec.params
    low = p.get("low_scale_config", {}).get("params", {}).get("noise_schedule_config")
    d = X4_LOW_RES_SCHEDULE  # the defaults of the reference's low-scale model, too
    low_res = Schedule(low.get("linear_start", d.linear_start), low.get("linear_end", d.linear_end)) if low else None
    return Pipeline(
        family=spec.family, unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
        pad_id=pad_id, v_prediction=spec.v_prediction, low_res_schedule=low_res,
        schedule=Schedule(p.get("linear_start", 0.00085), p.get("linear_end", 0.012), p.get("timesteps", 1000)),
        native_size=spec.native_size, placement=placement, model_name=ckpt.stem, model_hash=model_hash(ckpt),
        config_source=spec.config_source,
    )


def _load_diffusers_folder(
    folder: Path, placement: Placement, req: LoadRequest, expect: tuple[str, ...]
) -> Pipeline:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

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
    in_channels = unet.config.in_channels
    if in_channels == 7:
        family = X4
    elif in_channels == 4:
        family = SD2 if text_encoder.config.hidden_act == "gelu" else SD1
    else:
        raise CheckpointError(f"--ckpt {folder}: a {in_channels}-channel UNet; sdgen supports SD 1.x, SD 2.x and x4")
    _check_family(family, expect, folder)
    v = sched.get("prediction_type") == "v_prediction" if req.v_prediction is None else req.v_prediction
    parts = {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "vae_fp32": family == X4}
    _place(parts, placement, req.low_vram)
    schedule = Schedule(sched.get("beta_start", 0.00085), sched.get("beta_end", 0.012),
                        sched.get("num_train_timesteps", 1000))
    low_res = None
    low_file = folder / "low_res_scheduler" / "scheduler_config.json"
    if low_file.is_file():
        low_cfg = json.loads(low_file.read_text())
        d = X4_LOW_RES_SCHEDULE
        low_res = Schedule(low_cfg.get("beta_start", d.linear_start), low_cfg.get("beta_end", d.linear_end))
    return Pipeline(
        family=family, unet=unet, vae=vae, text_encoder=text_encoder, pad_id=0 if family != SD1 else 49407,
        v_prediction=v, schedule=schedule, native_size=int(unet.config.sample_size) * 8,
        placement=placement, model_name=folder.name, model_hash=None, config_source="diffusers folder",
        low_res_schedule=low_res,
    )
