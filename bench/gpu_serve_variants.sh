#!/usr/bin/env bash
# The HTTP load (bench.serve, concurrency 64) against `fapool serve` started once per variant of
# Ray Serve's settings, each load run LOADS times, so that run-to-run spread shows beside the
# variants' difference. Same set-up as gpu_serve.sh (Ray at /tmp/site, flash-attn-4 at /tmp/fa4).
#   VARIANTS="default proxy" LOADS=3 bash bench/gpu_serve_variants.sh
# A variant named twice is started twice: the spread between server starts shows too. Results:
# $OUT/variants.json (or bench/results/), keyed variant-<variant>-s<start>-<load>, and each server's log.
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH=/tmp/sc:/tmp/site:$PWD RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
start=0
for variant in ${VARIANTS:-default proxy}; do
  start=$((start + 1))
  envs=() flags=()
  case $variant in
    default) ;;  # `fapool serve` as shipped: direct ingress (the ingress replica serves --port)
    # Serve's HTTP proxy in front of the ingress replica (the default before session 7).
    proxy) flags=(--ingress proxy) ;;
    # Ray Serve's throughput-optimized settings, behind the proxy.
    tuned) flags=(--ingress proxy)
           envs=(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0
                 RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1000 RAY_SERVE_LOG_TO_STDERR=0) ;;
    # SSE chunks of a stream gathered for 4x shorter (serve/sse.py's Gathering).
    chunks4000) flags=(--stream-chunks-per-s 4000) ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  env "${envs[@]}" python -m serve.cli serve --model "${MODEL:-paper}" --device cuda --port 8000 --max-pool 0 \
    "${flags[@]}" ${SERVE_FLAGS:-} > "$out/serve-$variant-s$start.log" 2>&1 &
  server=$!
  for _ in $(seq 1 60); do
    curl -sf -m 2 http://127.0.0.1:8000/ready >/dev/null && break
    kill -0 $server 2>/dev/null || { tail -30 "$out/serve-$variant-s$start.log"; break; }
    sleep 2
  done
  for i in $(seq 1 "${LOADS:-3}"); do
    before=$(curl -s http://127.0.0.1:8000/metrics)
    python -m bench.serve --url http://127.0.0.1:8000 --out "$out" --name "variant-$variant-s$start-$i" 2>&1 | tail -1 \
      | sed "s/^/$variant, start $start, load $i: /"
    # The server's own view of the same load: mean TTFT from the ingress's start of the request,
    # and mean wait on the base before admission (the rest of the client's TTFT is the HTTP path).
    python - "$before" "$(curl -s http://127.0.0.1:8000/metrics)" <<'PY'
import sys
def sums(text):
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, val = line.split("{")[0].split(" ")[0], float(line.rsplit(" ", 1)[1])
        out[name] = out.get(name, 0.0) + val
    return out
a, b = sums(sys.argv[1]), sums(sys.argv[2])
for m in ("fapool_time_to_first_token_seconds", "fapool_request_queue_time_seconds", "fapool_e2e_request_latency_seconds"):
    n = b.get(m + "_count", 0) - a.get(m + "_count", 0)
    if n:
        print(f"   server {m}: mean {1e3 * (b[m + '_sum'] - a.get(m + '_sum', 0)) / n:.0f} ms over {n:.0f}")
PY
  done
  kill -INT $server; wait $server
done
# One file for all loads (the device tool brings back only so many files).
python - "$out" <<'PY'
import glob, json, os, sys
files = sorted(glob.glob(os.path.join(sys.argv[1], "variant-*.json")))
json.dump({os.path.basename(f)[:-5]: json.load(open(f)) for f in files},
          open(os.path.join(sys.argv[1], "variants.json"), "w"), indent=1)
for f in files:
    os.remove(f)
PY
