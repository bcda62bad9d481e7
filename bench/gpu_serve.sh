#!/usr/bin/env bash
# HTTP serving on one lent GPU: `fapool serve` with the paper model, then `bench.serve` against it
# (concurrency 64, first request after /ready, the stall test). Needs Ray for that machine's Python
# unpacked at /tmp/site (../shared/device/bundle-site.sh) and, for the paged kernel, flash-attn-4
# at /tmp/fa4 with /tmp/sc/sitecustomize.py adding it (../shared/device/bundle-fa4.sh).
#   bash bench/gpu_serve.sh        # results in $OUT (or bench/results)
#   SERVE_FLAGS=--torch-compile NAME=serve-paper-H200-compiled bash bench/gpu_serve.sh
set -euo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH=/tmp/sc:/tmp/site:$PWD RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
python -m serve.cli serve --model "${MODEL:-paper}" --device cuda --port 8000 --max-pool 0 ${SERVE_FLAGS:-} > "$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 150); do
  curl -sf -m 2 http://127.0.0.1:8000/ready >/dev/null && break
  kill -0 $server 2>/dev/null || { tail -30 "$out/serve.log"; exit 1; }
  sleep 2
done
name=${NAME:-serve-${MODEL:-paper}-H200}
python -m bench.serve --url http://127.0.0.1:8000 --ttft --stall --out "$out" --name "$name" 2>&1 | tail -8
# The same load again with the bases' step logs read around it: where the serving layer, not the
# GPU, sets the pace (bench/steplog.py).
python -m bench.steplog --clear && python -m bench.serve --url http://127.0.0.1:8000 --out "$out" \
  --name "$name-again" 2>&1 | tail -2 && python -m bench.steplog --raw --out "$out/$name-steps.json" || true
kill -INT $server; wait $server || true
# The benchmark client's own ceiling on this host: the same load against a clock-paced stand-in.
python -m bench.serve --stand-in --out "$out" --name "$name-client-ceiling" 2>&1 | tail -1
grep -c "captured the decode step" "$out/serve.log" || true
