"""What listens on `fapool serve --port`: the Serve ingress replica itself (Ray Serve's direct
ingress) or Serve's HTTP proxy in front of it. The proxy relays every streamed chunk through one
more process: at 64 streams on an H200 that capped tokens/s at 1.2-1.4x below direct
(docs/benchmarks.md, "Ray Serve settings side by side")."""
from __future__ import annotations

import socket
from dataclasses import dataclass

CHOICES = ("auto", "direct", "proxy")


@dataclass(frozen=True)
class Ingress:
    mode: str  # "direct" or "proxy"
    proxy_port: int  # where Serve's proxy listens: --port itself, or a free port beside it


def plan(choice: str, started_here: bool, host: str, port: int) -> Ingress:
    """Resolve `--ingress` before Ray starts; a ValueError says what to change."""
    mode = choice if choice != "auto" else ("direct" if started_here else "proxy")
    if mode == "proxy":
        return Ingress("proxy", port)
    if not started_here:
        raise ValueError("--ingress direct: Ray Serve reads that setting when its processes start, so it "
                         "needs the Ray cluster this command starts; with --address or RAY_ADDRESS use "
                         "--ingress proxy (deploy/README.md says how to start a cluster with direct ingress)")
    # The replica binds --port only once the model is loaded: say so now, not after a failed deployment.
    if not _bindable(host, port):
        raise ValueError(f"--port {port} on {host} is already in use: stop what holds it or pass another --port")
    return Ingress("direct", _free_port(host))  # Serve keeps its proxy, on a port of its own


def direct_ingress_env(port: int) -> dict[str, str]:
    """The Ray Serve settings, read when its processes start, that make the ingress replica serve
    `port` itself."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # the range's end is exclusive
        # No load balancer has to deregister the replica first; `drain` waits for requests instead.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        # A replica that Serve starts again must get `port` back at once, not 30 s later.
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bindable(host: str, port: int) -> bool:
    with socket.socket(_family(host)) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def bind_replica_grpc_to_node_ip() -> None:
    """Ray Serve's replica starts an inter-deployment gRPC server on every interface ("[::]:0",
    with no setting to change it) once its deployment's __init__ has run: bind it to the node's IP,
    as Ray's own servers are (loopback for the cluster `fapool serve` starts). Call from __init__."""
    import ray
    from ray.serve._private import replica

    add = replica.add_port_to_grpc_server
    if getattr(add, "fapool_pinned", False):
        return

    def pinned(server, address: str) -> int:
        if address == "[::]:0":
            ip = ray.util.get_node_ip_address()
            address = f"[{ip}]:0" if ":" in ip else f"{ip}:0"
        return add(server, address)

    pinned.fapool_pinned = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = pinned
