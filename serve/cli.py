"""`fapool serve`: start (or join) a Ray cluster, deploy the app, serve until Ctrl-C."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from pydantic import ValidationError

from fapool.policy import DEFAULT_CURVE

log = logging.getLogger("fapool")


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
    s.add_argument("--kv-capacity-tokens", type=int, default=None, help="KV cache per base (default: from memory)")
    s.add_argument("--request-timeout-s", type=float, default=600.0)
    s.add_argument("--max-inflight", type=int, default=1024, help="requests in flight before HTTP 429")
    s.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies get HTTP 413")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve_main(args)
    return 2


def serve_main(args: argparse.Namespace) -> int:
    from serve.options import ServeOptions

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "address")}
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
    from actors.config import CONTROLLER_NAME, NAMESPACE
    from serve.app import build_app

    started_here = not (args.address or os.environ.get("RAY_ADDRESS"))
    connect(args.address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port})
        serve.run(build_app(opts.model_dump()), name="fapool", route_prefix="/", blocking=False)
        key = " (API key required)" if opts.resolved_api_key() else ""
        print(f"FA Pool serving {opts.model!r} on http://{opts.host}:{opts.port}{key}; Ctrl-C to stop", flush=True)
        stop.wait()
    finally:
        print("FA Pool shutting down", flush=True)
        try:
            serve.delete("fapool")
            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            ray.get(controller.shutdown.remote(), timeout=60)
            ray.kill(controller)
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.warning("cleanup: %s", e)
        if started_here:
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
