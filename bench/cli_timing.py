#!/usr/bin/env python
"""Run one real `sdgen` CLI command and print where its time went (load, text encoder, UNet, VAE decode).

    python bench/cli_timing.py upscale IN.png --ckpt X4.safetensors --steps 2 --tile 128 --seed 1 --outdir DIR
    /usr/bin/time -v python bench/cli_timing.py txt2img "a cat" --ckpt CKPT --steps 2   # + peak RSS

The command runs exactly as `sdgen ARGS...` (sdgen.cli.main); the only addition is timing hooks on the models
the loader returns (forward hooks on the UNet and text encoder, a wrapper around vae.decode). The summary goes
to stderr when the command exits. CUDA calls are synchronised at every hook.
"""

from __future__ import annotations

import atexit
import sys
import time


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return
    import torch

    from sdgen import loader

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench import Probe  # noqa: E402  (bench/bench.py, beside this file)

    t_start = time.perf_counter()
    state: dict = {}
    original_load = loader.load

    def load(*args, **kwargs):
        t = time.perf_counter()
        pipe = original_load(*args, **kwargs)
        state["load_s"] = time.perf_counter() - t
        cuda = pipe.placement.torch_device.type == "cuda"
        state["probe"] = Probe(pipe.unet, pipe.text_encoder, pipe.vae, cuda)
        state["pipe"] = pipe
        return pipe

    loader.load = load

    def summary() -> None:
        total = time.perf_counter() - t_start
        probe = state.get("probe")
        lines = [f"cli_timing: wall {total:.1f} s (from interpreter start of sdgen.cli.main)"]
        if probe is not None:
            calls = probe.calls("unet")
            durations = sorted(b - a for a, b in probe.events.get("unet", []))
            median = durations[len(durations) // 2] if durations else float("nan")
            lines += [
                f"cli_timing: load {state['load_s']:.1f} s",
                f"cli_timing: text encoder {probe.total('text_encoder'):.2f} s in {probe.calls('text_encoder')} calls",
                f"cli_timing: UNet {calls} calls, {probe.total('unet'):.1f} s inside, span {probe.span('unet'):.1f} s "
                f"(first call start -> last call end), median call {median:.2f} s",
                f"cli_timing: VAE decode {probe.total('vae_decode'):.1f} s in {probe.calls('vae_decode')} calls",
                f"cli_timing: notes {state['pipe'].notes}, OOM ladder level {state['pipe'].memory.level}",
            ]
            if torch.cuda.is_available() and state["pipe"].placement.torch_device.type == "cuda":
                lines.append(f"cli_timing: CUDA max allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print("\n".join(lines), file=sys.stderr, flush=True)

    atexit.register(summary)
    from sdgen.cli import cli

    cli(args=sys.argv[1:], prog_name="sdgen")


if __name__ == "__main__":
    main()
