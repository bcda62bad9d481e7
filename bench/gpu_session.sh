#!/usr/bin/env bash
# The GPU checks and benchmarks of one session on a lent 4-GPU machine, in calls that each fit the
# device tool's 10-minute limit. Run from the repository root, carrying `.devsite` (Ray for that
# machine: ../shared/device/bundle-site.sh "ray[serve]==2.60.0" fastapi prometheus-client):
#
#   bash bench/gpu_session.sh check   # GPU tests + decode kernels side by side (about 3 min)
#   bash bench/gpu_session.sh engine  # one GPU: the GPU tests, then bench.engine's graph, compiled
#                                     # and eager modes side by side (about 8 min; also carry .devfa*)
#   bash bench/gpu_session.sh bench   # paper model, pools 0/1/3, 16K and 64K, batches 1 and 8,
#                                     # (about 7 min)
#   bash bench/gpu_session.sh full    # the same grid plus the oversized batch, the transformers
#                                     # baseline and the scale-up (about 9 min)
#
# Results land in $OUT (the device tool's output folder) or bench/results; then, here:
#   python -m bench.report bench/results/<name>.json --out docs/benchmarks.md
set -euo pipefail
out=${OUT:-bench/results}
if [ -f .devsite/site.tar.xz ] && [ ! -d /tmp/site/ray ]; then
  mkdir -p /tmp/site && tar -xJf .devsite/site.tar.xz -C /tmp/site
fi
# /tmp/sc adds flash-attn-4 where it was unpacked (../shared/device/bundle-fa4.sh; see gpu_serve.sh).
export PYTHONPATH=/tmp/sc:/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
case "${1:-check}" in
  check)
    timeout 240 python -m pytest -q -x -p no:cacheprovider tests/gpu 2>&1 | tail -15
    timeout 120 python -m bench.decode_kernels --out "$out"
    ;;
  engine)
    timeout 200 python -m pytest -q -p no:cacheprovider -p no:warnings --tb=short tests/gpu/test_gpu_paged.py \
      tests/gpu/test_gpu_kernels.py > "$out/gpu-tests.log" 2>&1 || true  # the benchmark runs either way
    tail -40 "$out/gpu-tests.log" | grep -E "^(FAILED|ERROR|E  )|passed|failed" | tail -12
    # MODES=graph,compiled to skip eager; FAPOOL_BENCH_PROFILE=1 adds kernel tables (in engine.log).
    timeout 360 python -m bench.engine --preset paper --modes "${MODES:-graph,compiled,eager}" --out "$out" \
      > "$out/engine.log" 2>&1; tail -16 "$out/engine.log"
    ;;
  bench)
    timeout 560 python -m bench.run --preset paper --contexts 16384,65536 --batches 1,8 --steps 16 \
      --oversized 0 --no-scaleup --no-hf --name paper-decode-prefill --out "$out" 2>&1 | tail -40
    ;;
  full)
    timeout 580 python -m bench.run --preset paper --contexts 16384,65536 --batches 1,8 --steps 16 \
      --name paper-full --out "$out" 2>&1 | tail -50
    ;;
  *) echo "usage: bash bench/gpu_session.sh check|engine|bench|full" >&2; exit 2 ;;
esac
