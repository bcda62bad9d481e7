"""`fapool serve`: start (or join) a Ray cluster, deploy the app, serve until Ctrl-C."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("fapool")
APP = "fapool"  # the Serve application's name


def parser() -> argparse.ArgumentParser:
    from serve import ingress
    from serve.options import ServeOptions, add_flags

    p = argparse.ArgumentParser(prog="fapool", description="FA Pool: elastic LLM serving on Ray")
    p.add_argument("--version", action="version", version=f"fapool {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model over HTTP", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(s, ServeOptions)
    # How this process runs, not what it serves: not part of the app's settings.
    s.add_argument("--address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else start one)")
    s.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, how long requests in flight may take to finish")
    s.add_argument("--ray-host", default="127.0.0.1",
                   help="where the Ray cluster this command starts listens (its node IP: GCS, raylet, workers, "
                        "agents, dashboard and Jobs API). Loopback keeps it to this machine whatever --host is; "
                        "another address lets other nodes join and needs Ray's token auth (README, Security)")
    s.add_argument("--ingress", choices=ingress.CHOICES, default="auto",
                   help="what listens on --port: 'direct', the ingress replica itself (Ray Serve's direct "
                        "ingress: no proxy hop per streamed chunk; needs the Ray cluster this command "
                        "starts), or 'proxy', Serve's HTTP proxy; auto: direct when this command starts Ray")
    return p


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fapool")
    except metadata.PackageNotFoundError:  # a source tree without install
        return "0.1.0"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve_main(args)
    return 2


def serve_main(args: argparse.Namespace) -> int:
    from serve.options import ServeOptions, options_from

    if args.shutdown_grace_s < 0:
        print("fapool serve: --shutdown-grace-s: use a duration >= 0", file=sys.stderr)
        return 2
    try:
        opts = options_from(ServeOptions, args)
    except ValueError as e:
        print(f"fapool serve: {e}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from actors import ray_node
    from actors.cluster import connect
    from serve import http_limits
    from serve.app import build_app
    from serve.ingress import direct_ingress_env, plan

    address = args.address or os.environ.get("RAY_ADDRESS")
    started_here = not address
    try:
        ray_node.check_address(address, args.ray_host)
        ingress = plan(args.ingress, started_here, opts.host, opts.port)
    except ValueError as e:
        print(f"fapool serve: {e}", file=sys.stderr)
        return 2
    if ingress.mode == "direct":
        os.environ.update(direct_ingress_env(opts.port))  # before Ray starts: its processes inherit them
    if started_here:
        os.environ.update(http_limits.env(opts.http_limits()))  # Serve's HTTP servers read them (serve/http_limits.py)
    ctx = connect(args.address, ray_host=args.ray_host)
    logging.getLogger("ray.serve").addFilter(_ServeNoise())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": opts.host, "port": ingress.proxy_port,
                                  "keep_alive_timeout_s": opts.keep_alive_s})
        serve.run(build_app(opts.model_dump()), name=APP, route_prefix="/", blocking=False)
        key = " (API key required)" if opts.resolved_api_key() else ""
        how = (f"direct ingress; Serve's proxy on port {ingress.proxy_port}" if ingress.mode == "direct"
               else "Serve's proxy")
        print(f"FA Pool serving {opts.model!r} on http://{opts.host}:{opts.port}{key} ({how}); Ctrl-C to stop "
              f"(Ray at {ray.get_runtime_context().gcs_address})", flush=True)
        print(jobs_line(ray_node.jobs_api(ctx), ray_node.auth_mode()), flush=True)
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
        if started_here:  # the whole cluster goes: Serve with it (serve.shutdown() here only adds a
            ray.shutdown()  # failed graceful_shutdown task of its killed controller to the log)
    print("FA Pool stopped", flush=True)
    return 0


def jobs_line(api: str | None, auth: str) -> str:
    """Where the cluster's Jobs API is and the line that submits a job to it."""
    if api is None:
        return "Ray's Jobs API: none (this Ray cluster runs no dashboard)"
    # Ray's CLI sends the token (from ~/.ray/auth_token) only when RAY_AUTH_MODE says token.
    env = "RAY_AUTH_MODE=token " if auth == "token" else ""
    return (f"Ray's Jobs API at {api} ({'token auth' if auth == 'token' else 'NO auth'}); submit with: "
            f"{env}ray job submit --address {api} --working-dir . -- python -m serve.batch --input ... --output ...")


class _ServeNoise(logging.Filter):
    """Serve's start-up lines that mislead here: serve.run re-connecting to the Serve this command
    just started ("New http_options ... will not be applied"), and "ready at" naming the proxy's
    port, which with direct ingress is not the app's. FA Pool's own line says where it serves."""

    DROP = ("New http_options", "is ready at http")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(d in record.getMessage() for d in self.DROP)


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
