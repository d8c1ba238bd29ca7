#!/usr/bin/env python
"""Start-up time and peak memory of the real `sdgen txt2img` / `sdgen upscale`, each in a new process.

For each precision, runs `python bench/cli_timing.py <command> ...` (the real CLI plus timing hooks) --repeats
times on a full-size random-weight checkpoint (written once by bench/bench.py's ensure_checkpoint, fp16
.safetensors as downloaded checkpoints mostly are) and reports the medians of:

  start -> first step   wall seconds from the process's creation (interpreter start and every import
                        included) to the start of the first UNet call, and the CPU-seconds spent by then
  peak RSS              the process's VmHWM over the whole run (load, denoising, VAE decode, PNG written)

The page cache is warm after the first repeat (the file was just written or read); run with --repeats >= 2
and read the median. Steps default to 1: the figures do not depend on the step count, except the wall time.

    python bench/startup.py --model sd15 --precision fp32 bf16 --repeats 3
    python bench/startup.py --model sd2v --precision fp32 --repeats 2
    python bench/startup.py --model x4 --precision fp32 --repeats 2      # upscale of a 128x128 input -> 512
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATTERNS = {
    "first_wall": r"first UNet call ([\d.]+) s wall",
    "first_cpu": r"first UNet call [\d.]+ s wall, ([\d.]+) CPU-s",
    "peak_gib": r"peak RSS ([\d.]+) GiB",
    "load_s": r"cli_timing: load ([\d.]+) s",
    "wall_s": r"cli_timing: wall ([\d.]+) s",
}


def one_run(args, ckpt: Path, precision: str, outdir: Path, input_png: Path | None) -> dict[str, float]:
    common = ["--ckpt", str(ckpt), "--steps", str(args.steps), "--seed", "1", "--precision", precision]
    common += ["--outdir", str(outdir), "--device", args.device, "-q"]
    if args.model == "x4":
        command = ["upscale", str(input_png), *common]
    else:
        command = ["txt2img", "a photograph of an astronaut riding a horse", *common, "-H", str(args.size)]
        command += ["-W", str(args.size)]
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # users' installs have .pyc files: measure with them
    done = subprocess.run(
        [sys.executable, str(HERE / "cli_timing.py"), *command], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"startup: the run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    out = {}
    for key, pattern in PATTERNS.items():
        m = re.search(pattern, done.stderr)
        out[key] = float(m.group(1)) if m else float("nan")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("sd15", "sd2v", "x4"), default="sd15")
    p.add_argument("--precision", nargs="+", default=["fp32"], help="fp32, bf16 (CPU) or fp16 (CUDA).")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--size", type=int, default=None, help="txt2img -H/-W (default: the model's native size).")
    p.add_argument("--file-dtype", default="fp16", choices=("fp16", "fp32", "bf16"))
    p.add_argument("--device", default="cpu", help="cpu or cuda (the run's --device).")
    args = p.parse_args(argv)
    args.memory_fraction = None  # bench.environment reads it
    sys.path.insert(0, str(HERE))
    import bench

    cache = Path(os.environ.get("SDGEN_BENCH_CACHE", Path(tempfile.gettempdir()) / "sdgen-bench"))
    ckpt = bench.ensure_checkpoint(args.model, cache, args.file_dtype, print)
    args.size = args.size or bench.MODELS[args.model][2]
    input_png = bench.bench_input_png(cache, 128) if args.model == "x4" else None
    weights_gib = ckpt.stat().st_size / 2**30
    print(f"startup: {ckpt.name} ({weights_gib:.2f} GiB), {args.steps} step(s), {bench.environment(args)}")
    rows = []
    for precision in args.precision:
        runs = []
        for i in range(args.repeats):
            with tempfile.TemporaryDirectory() as outdir:
                runs.append(one_run(args, ckpt, precision, Path(outdir), input_png))
            print(f"startup: {precision} run {i + 1}: {runs[-1]}", flush=True)
        med = {k: statistics.median(r[k] for r in runs) for k in PATTERNS}
        rows.append((precision, med, min(r["first_wall"] for r in runs)))
    print("\n| precision | start -> first step (median, s) | CPU-s by then | peak RSS (GiB) | load (s) |")
    print("|---|---|---|---|---|")
    for precision, med, best in rows:
        print(
            f"| {precision} | {med['first_wall']:.2f} (best {best:.2f}) | {med['first_cpu']:.2f} | "
            f"{med['peak_gib']:.2f} | {med['load_s']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
