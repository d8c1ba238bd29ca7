#!/usr/bin/env bash
# The GPU rows of the speed/memory issue, one part per call, for a machine with CUDA and torch but no network.
#
# Here (with network), once per session, fetch the wheels the GPU machine lacks (Python 3.12 there):
#   bash bench/gpu_session.sh wheels          # -> .whl/ (add '/.whl/' to .git/info/exclude)
# There, from the repository root (each part fits in ten minutes on an H100; a new machine needs 'setup'
# first in the same command, and it writes the random checkpoint again, about a minute):
#   bash bench/gpu_session.sh setup eager compile      # then: setup lowvram upscale / setup batch startup
# Reports (Markdown) go to $OUT (or bench-out/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SDGEN_BENCH_CACHE=/tmp/sdgen-bench XDG_CACHE_HOME=/tmp/sdgen-cache
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
bench() { python3 bench/bench.py "$@" --markdown "$OUT/$part.md" 2>&1 | tee -a "$OUT/log.txt"; }

for part in "$@"; do
  echo "== $part" | tee -a "$OUT/log.txt"
  case "$part" in
    wheels)  # versions as tested on the CPU; the GPU image has torch, transformers, scipy, Pillow, click
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 \
        invisible-watermark==0.2.0 PyWavelets==1.9.0 ftfy==6.3.1 wcwidth==0.9.4 ;;
    setup)  # wheels and sdgen itself (with sdgen.configs and sdgen.testing, which bench.py uses) into /tmp/site
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
      python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .
      python3 -c "import torch, diffusers, sdgen; print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name())" \
        | tee -a "$OUT/log.txt" ;;
    eager)    bench --model sd15 --device cuda --steps 50 ;;
    compile)  bench --model sd15 --device cuda --steps 50 --compile --diffusers-compile ;;
    autotune) bench --model sd15 --device cuda --steps 50 --compile --compile-mode max-autotune --only sdgen ;;
    batch)    bench --model sd15 --device cuda --steps 50 --batch 8 --compile --only sdgen ;;
    lowvram)  bench --model sd15 --device cuda --steps 50 --low-vram --memory-fraction 0.0125 --only sdgen ;;
    upscale)  bench --upscale --device cuda --memory-fraction 0.1 ;;
    startup)  # after a part that wrote the checkpoint: a compiled first image in a new process, with an empty
      # compile cache and then with the cache the first run left (the issue's figure: <= 15 s, load included)
      ckpt=$(ls /tmp/sdgen-bench/bench-sd15-*.safetensors | head -1)
      export XDG_CACHE_HOME; XDG_CACHE_HOME=$(mktemp -d)
      for cache in cold warm; do
        t0=$(date +%s.%N)
        # the installed entry point (sdgen.cli:main), as a user runs it
        /tmp/site/bin/sdgen txt2img "a cat" --ckpt "$ckpt" --steps 50 --seed 1 --compile -q \
          --outdir "$OUT/startup-$cache" 2>&1 | tee -a "$OUT/log.txt"
        echo "startup, $cache compile cache: $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s wall" \
          | tee -a "$OUT/log.txt"
      done ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
