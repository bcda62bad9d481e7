"""How a process starts or joins Ray, closed by default.

A Ray cluster runs any code a client sends it (CVE-2023-48022, "ShadowRay"), so the one that
`fapool serve`, a job's driver or `serve.batch` starts is reachable by its user only:

- every Ray process listens on loopback: the node IP is 127.0.0.1, which makes Ray's gRPC servers
  (GCS, raylet, workers, agents) bind 127.0.0.1 alone, and the dashboard (Jobs API) binds it too.
  `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is Ray's own switch for that: without it `ray.init` turns
  a loopback `_node_ip_address` into the machine's external address;
- Ray's token authentication stays on (Ray's default for a new cluster, unless `RAY_AUTH_MODE` says
  otherwise), with the token file at mode 0600;
- with `RAY_AUTH_MODE=disabled` (tests, CI) nothing but loopback is allowed at all.

`ray.init` fixes the dashboard agent's HTTP port (the Jobs API's back end) at 52365 and has no
argument for it, so a second cluster on the host could not bind it and lost job submission; the
agent gets a free port instead, which it registers in the GCS, where the dashboard finds it.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import ray

log = logging.getLogger("fapool")
LOOPBACK = "127.0.0.1"


def auth_mode() -> str:
    """'token' or 'disabled': what `RAY_AUTH_MODE` says, else Ray's default for a new cluster."""
    return "disabled" if os.environ.get("RAY_AUTH_MODE", "token").lower() == "disabled" else "token"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a DNS name: assume it leaves the machine


def address_host(address: str) -> str | None:
    """The host of a Ray address (`HOST:PORT`, `ray://HOST:PORT`, `http://HOST:PORT`); None for
    `auto`/`local`, which mean a cluster on this machine."""
    if address in ("auto", "local"):
        return None
    return urlsplit(address if "://" in address else "//" + address).hostname


def check_address(address: str | None, node_ip: str = LOOPBACK) -> None:
    """Raises ValueError when Ray would be reachable beyond loopback without token auth."""
    if auth_mode() != "disabled":
        return
    host = address_host(address) if address else node_ip
    if host is not None and not is_loopback(host):
        what = f"the Ray address {address!r}" if address else f"--ray-host {node_ip}"
        raise ValueError(f"{what} is not loopback and RAY_AUTH_MODE=disabled: anyone who reaches it could run "
                         "code on the cluster; unset RAY_AUTH_MODE (Ray's token auth) or use a loopback address")


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ensure_private_token() -> None:
    """The token file exists and only its owner can read it. Ray writes a new one with the umask's
    mode (0644 by default), so this writes it first, at 0600, and narrows an existing one."""
    if os.environ.get("RAY_AUTH_TOKEN"):  # given inline: no file
        return
    path = token_path()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what Ray's own generator writes: 256 random bits
    elif path.stat().st_mode & 0o077:
        log.warning("Ray's token file %s was readable by others; its mode is now 0600", path)
        os.chmod(path, 0o600)


@contextmanager
def _free_agent_port() -> Iterator[None]:
    from ray._private import parameter

    base = parameter.RayParams

    def params(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("dashboard_agent_listen_port", 0)  # 0: any free port (the agent reports it)
        return base(*args, **kwargs)

    parameter.RayParams = params  # ray.init looks it up on each call
    try:
        yield
    finally:
        parameter.RayParams = base


def use_loopback() -> None:
    """This process (and those it starts) takes loopback for this node's IP, as the cluster that
    `start_local` starts does; a client of that cluster needs it too, or Ray turns the loopback
    address it is given into the machine's external one, where nothing listens."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's processes read it when they start
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported Ray already


def start_local(node_ip: str = LOOPBACK, **init_kwargs: Any) -> Any:
    """Start a Ray instance here, closed by default (see the module's doc); returns ray.init's context."""
    check_address(None, node_ip)
    if is_loopback(node_ip):
        use_loopback()
        node_ip = LOOPBACK
    if auth_mode() == "token":
        ensure_private_token()
    init_kwargs.setdefault("dashboard_host", node_ip)
    # A temp dir of its own: Ray's job supervisor sends each job's driver to "the latest cluster
    # started in this temp dir" (its ray_current_cluster file), which in the shared /tmp/ray is
    # whichever `ray start` ran last on the host, not this cluster.
    temp_dir = init_kwargs.pop("_temp_dir", None) or tempfile.mkdtemp(prefix="fapool-ray-", dir="/tmp")
    with _free_agent_port():
        ctx = ray.init(_node_ip_address=node_ip, _temp_dir=temp_dir, **init_kwargs)
    from ray._private.utils import write_ray_address

    write_ray_address(ray.get_runtime_context().gcs_address, temp_dir)
    return ctx


def join(address: str, **init_kwargs: Any) -> Any:
    """Join a running cluster; warns when it answers without a token. (Refusing a non-loopback
    address without auth is `fapool serve`'s call, made before it joins: a job's driver runs
    inside the cluster it was sent to.)"""
    host = address_host(address)
    if host is None or is_loopback(host):
        use_loopback()
    ctx = ray.init(address=address, **init_kwargs)
    if not accepts_tokenless(ray.get_runtime_context().gcs_address):
        return ctx
    log.warning("the Ray cluster at %s has no authentication: anyone who reaches its ports can run code on it. "
                "Start it with RAY_AUTH_MODE=token and keep it on a private network (deploy/README.md, "
                "'Securing a Ray cluster')", address)
    return ctx


def accepts_tokenless(gcs_address: str) -> bool:
    """Whether the cluster's GCS answers a call that carries no token. (Its dashboard's
    `/api/authentication_mode` would say too, but a joined driver may be told a stale dashboard
    address: the port Ray wanted, not the free one it took.)"""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    if auth_mode() == "disabled":
        return True  # we got in without a token
    with grpc.insecure_channel(gcs_address) as channel:
        kv = gcs_service_pb2_grpc.InternalKVGcsServiceStub(channel)
        try:
            kv.InternalKVKeys(gcs_service_pb2.InternalKVKeysRequest(prefix=b"fapool-auth-probe/"), timeout=10)
        except grpc.RpcError:
            return False  # UNAUTHENTICATED, or a channel we cannot judge (TLS): no warning
    return True


def jobs_api(ctx: Any) -> str | None:
    """The Jobs API's address (Ray's dashboard) of a cluster this process is connected to."""
    url = getattr(ctx, "dashboard_url", None)
    if not url:
        return None
    return url if "://" in url else "http://" + url
