"""`fapool serve`: start (or join) a Ray cluster, deploy the app, serve until Ctrl-C."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from pydantic import ValidationError

from fapool.policy import DEFAULT_CURVE

log = logging.getLogger("fapool")
APP = "fapool"  # the Serve application's name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fapool", description="FA Pool: elastic LLM serving on Ray")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model over HTTP", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--model", default="tiny", help="'tiny' (embedded), 'paper', or a Hugging Face model directory")
    s.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 to accept remote clients")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--base-actors", type=int, default=1, help="base actors (one GPU each)")
    s.add_argument("--max-pool", type=int, default=32, help="attention pool actors at most (0..32)")
    s.add_argument("--pool-curve", default=DEFAULT_CURVE, help="pool size by longest context, LEN:SIZE,...")
    s.add_argument("--pool-cooldown-s", type=float, default=30.0, help="seconds before the pool shrinks")
    s.add_argument("--accelerator-type", default=None, help="pin actors to one GPU model, e.g. A100 or H100")
    s.add_argument("--api-key", default=None, help="require this key on every route but /health (or FAPOOL_API_KEY)")
    s.add_argument("--address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else start one)")
    s.add_argument("--max-cpu-members", type=int, default=None,
                   help="pool actors at most on CPU (default: one per core the base actors leave free)")
    s.add_argument("--kv-capacity-tokens", type=int, default=None, help="KV cache per base (default: from memory)")
    s.add_argument("--request-timeout-s", type=float, default=600.0)
    s.add_argument("--max-inflight", type=int, default=1024, help="requests in flight before HTTP 429")
    s.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies get HTTP 413")
    s.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, how long requests in flight may take to finish")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve_main(args)
    return 2


def serve_main(args: argparse.Namespace) -> int:
    from serve.options import ServeOptions

    if args.shutdown_grace_s < 0:
        print("fapool serve: --shutdown-grace-s: use a duration >= 0", file=sys.stderr)
        return 2
    fields = {k: v for k, v in vars(args).items() if k not in ("command", "address", "shutdown_grace_s")}
    try:
        opts = ServeOptions(**fields)
    except ValidationError as e:
        for err in e.errors():
            flag = "--" + "-".join(str(x) for x in err["loc"]).replace("_", "-")
            print(f"fapool serve: {flag}: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from actors.cluster import connect
    from serve.app import build_app

    started_here = not (args.address or os.environ.get("RAY_ADDRESS"))
    connect(args.address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port})
        serve.run(build_app(opts.model_dump()), name=APP, route_prefix="/", blocking=False)
        key = " (API key required)" if opts.resolved_api_key() else ""
        print(f"FA Pool serving {opts.model!r} on http://{opts.host}:{opts.port}{key}; Ctrl-C to stop "
              f"(Ray at {ray.get_runtime_context().gcs_address})", flush=True)
        stop.wait()
    finally:
        print(f"FA Pool shutting down: requests in flight get {args.shutdown_grace_s:g}s", flush=True)
        try:
            drain(APP, args.shutdown_grace_s)
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.warning("drain: %s", e)
        try:
            # The ingress replica owns the FA Pool cluster: deleting the app stops every actor.
            serve.delete(APP)
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.warning("cleanup: %s", e)
        if started_here:
            serve.shutdown()
            ray.shutdown()
    print("FA Pool stopped", flush=True)
    return 0


def drain(app: str, grace_s: float) -> None:
    """Graceful shutdown: the app's ingress refuses new requests (`/ready` and new requests get
    503) and ends those still running at the deadline with an error; this waits until none is
    left on the bases, or the deadline."""
    import ray

    from actors.cluster import running_clusters
    from actors.config import NAMESPACE
    from serve.service import cluster_prefix

    controllers = [ray.get_actor(n, namespace=NAMESPACE) for n in running_clusters(cluster_prefix(app))]
    if not controllers:
        return
    deadline = time.time() + grace_s
    ray.get([c.begin_drain.remote(deadline) for c in controllers], timeout=10)
    time.sleep(1.0)  # the ingress's supervisor hears of it within `supervise_every_s`
    # Past the deadline the ingress ends what is left with an error event: give those a moment.
    while time.time() < deadline + 5.0:
        try:
            statuses = ray.get([c.status.remote() for c in controllers], timeout=5)
        except Exception:  # noqa: BLE001 - a dead controller: nothing more to wait for
            return
        if not any(st.contexts for st in statuses):
            return
        time.sleep(0.25)


if __name__ == "__main__":
    sys.exit(main())
