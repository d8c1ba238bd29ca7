#!/usr/bin/env python
"""Run one real `sdgen` CLI command and print where its time went (load, text encoder, UNet, VAE decode).

    python bench/cli_timing.py upscale IN.png --ckpt X4.safetensors --steps 2 --tile 128 --seed 1 --outdir DIR
    /usr/bin/time -v python bench/cli_timing.py txt2img "a cat" --ckpt CKPT --steps 2   # + peak RSS

The command runs exactly as `sdgen ARGS...` (sdgen.cli.cli); the only additions are timing hooks on the model
the loader returns (sdgen.checkpoints.load.load_model, which sdgen.api.load_model calls: forward hooks on the
UNet and text encoder, a wrapper around vae.decode) and a listener on the run's events (sdgen.api.run: the
notices; every event still reaches the CLI's sink). The summary goes to stderr when the command exits. CUDA
calls are synchronised at every hook.
"""

from __future__ import annotations

import atexit
import os
import resource
import sys
import time


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process was created (Linux: /proc/self/stat starttime against /proc/uptime,
    10 ms resolution), so the figure includes the interpreter's own start and every import."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return
    import torch

    from sdgen import api
    from sdgen.checkpoints import load as loading
    from sdgen.events import Notice

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench import Probe  # noqa: E402  (bench/bench.py, beside this file)

    t_start = time.perf_counter()
    since_start = seconds_since_process_start()
    process_start = t_start - since_start if since_start is not None else t_start
    state: dict = {"notices": []}
    original_load, original_run = loading.load_model, api.run

    def load_model(*args, **kwargs):
        t = time.perf_counter()
        model = original_load(*args, **kwargs)
        state["load_s"] = time.perf_counter() - t
        cuda = model.placement.torch_device.type == "cuda"
        # after a --compile load model.unet is the compiled wrapper: the hooks run outside the compiled graph
        state["probe"] = Probe(model.unet, model.text_encoder, model.vae, cuda)
        state["model"] = model

        def first_step(module, args):
            if "first_unet" not in state:
                state["first_unet"] = (time.perf_counter() - process_start, cpu_seconds())

        model.unet.register_forward_pre_hook(first_step)
        return model

    def run(model, spec, output, sink=None, *args, **kwargs):
        def listening(event):
            if isinstance(event, Notice):
                state["notices"].append(event.message)
            if sink is not None:
                sink(event)

        return original_run(model, spec, output, listening, *args, **kwargs)

    loading.load_model = load_model  # sdgen.api.load_model imports it from there at every call
    api.run = run  # the CLI calls api.run(...)

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
                "cli_timing: process start -> first UNet call {:.2f} s wall, {:.2f} CPU-s".format(
                    *state.get("first_unet", (float("nan"), float("nan")))
                ),
                f"cli_timing: text encoder {probe.total('text_encoder'):.2f} s in {probe.calls('text_encoder')} calls",
                f"cli_timing: UNet {calls} calls, {probe.total('unet'):.1f} s inside, span {probe.span('unet'):.1f} s "
                f"(first call start -> last call end), median call {median:.2f} s",
                f"cli_timing: VAE decode {probe.total('vae_decode'):.1f} s in {probe.calls('vae_decode')} calls",
                f"cli_timing: notices {state['notices']}, OOM ladder level {state['model'].memory.level}",
            ]
            if torch.cuda.is_available() and state["model"].placement.torch_device.type == "cuda":
                lines.append(f"cli_timing: CUDA max allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
        if hwm:
            lines.append(f"cli_timing: peak RSS {int(hwm[0]) / 2**20:.2f} GiB (VmHWM)")
        print("\n".join(lines), file=sys.stderr, flush=True)

    atexit.register(summary)
    from sdgen.cli import cli

    cli(args=sys.argv[1:], prog_name="sdgen")


if __name__ == "__main__":
    main()
