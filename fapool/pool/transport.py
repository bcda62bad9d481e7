"""The data plane: a torch.distributed process group per (base, membership epoch).

Gloo on CPU, NCCL on GPU. Each group is a standalone `ProcessGroup` on a fresh TCP store hosted
by the base (rank 0), so a pool member can belong to several bases' groups at once and a base can
re-form its group without touching any other base. Tensors never go through Ray on this path: a
Ray call costs about 0.8 ms, a message here tens of microseconds on GPU.

Nothing listens on a wildcard address: the store and gloo's pair sockets bind the address the
peers use (loopback when the whole group is on one node, else the node's Ray IP).
"""
from __future__ import annotations

import socket
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

HEADER_LEN = 4  # op, body length, and two spare fields
LOOPBACK = "127.0.0.1"
T = TypeVar("T")


class PoolFailure(RuntimeError):
    """The data plane broke mid-step (a member died or timed out)."""


def guard(fn: Callable[[], T]) -> T:
    """Run a data-plane call; its failure becomes a `PoolFailure` (the base then recomputes)."""
    try:
        return fn()
    except PoolFailure:
        raise
    except Exception as e:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses
        raise PoolFailure(f"data plane failed: {e}") from e


def local_ip_towards(host: str) -> str:
    """This machine's address on the route to `host` (loopback for loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # UDP: nothing is sent
        return s.getsockname()[0]


class DataPlane:
    """One process group; rank 0 is the base. Blocking helpers plus async receive for overlap."""

    def __init__(self, pg: dist.ProcessGroup, rank: int, world_size: int, device: torch.device, store: dist.Store) -> None:
        self.pg = pg
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self._store = store  # the master store must outlive the group

    @classmethod
    def host_store(cls, host: str, timeout_s: float) -> dist.TCPStore:
        """The base's side: a fresh store on a free port of `host` (read `.port`). TCPStore's own
        server would listen on every interface, so it gets a socket bound to `host` instead."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        return dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                             timeout=timedelta(seconds=timeout_s), master_listen_fd=sock.detach())

    @classmethod
    def connect(
        cls,
        store: dist.Store | None,
        host: str,
        port: int,
        prefix: str,
        rank: int,
        world_size: int,
        device: torch.device,
        timeout_s: float,
    ) -> "DataPlane":
        """Join the group `prefix` of `world_size` ranks; blocks until every rank has joined."""
        timeout = timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        scoped = dist.PrefixStore(prefix, store)
        if device.type == "cuda":
            try:
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                pg = dist.ProcessGroupNCCL(scoped, rank, world_size, opts)
            except (AttributeError, TypeError):  # older bindings: the default timeout
                pg = dist.ProcessGroupNCCL(scoped, rank, world_size)
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            # Pair sockets on the address the store is reached by, not whatever the hostname says.
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_ip_towards(host))]
            pg = dist.ProcessGroupGloo(scoped, rank, world_size, opts)
        return cls(pg, rank, world_size, device, store)

    def broadcast(self, t: torch.Tensor, wait: bool = True) -> dist.Work | None:
        """From rank 0 to all. With ``wait=False`` the caller's stream does not wait for it (the
        sender's own compute overlaps the transfer); the caller must ``wait()`` the returned work
        before it changes ``t``."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        work = self.pg.broadcast([t], opts)
        if not wait:
            return work
        work.wait()
        return None

    def gather(self, out: torch.Tensor | None, inp: torch.Tensor) -> None:
        """Every rank's ``inp`` into rank 0's ``out`` (world_size * inp.numel(), rank order); the
        other ranks pass ``out=None``. One call per side, the transfers run in parallel."""
        opts = dist.GatherOptions()
        opts.rootRank = 0
        outs = [list(out.view(self.world_size, -1).unbind(0))] if out is not None else []
        self.pg.gather(outs, [inp], opts).wait()

    def send(self, t: torch.Tensor, dst: int, tag: int = 0) -> None:
        self.pg.send([t], dst, tag).wait()

    def irecv(self, t: torch.Tensor, src: int, tag: int = 0) -> dist.Work:
        return self.pg.recv([t], src, tag)

    def send_header(self, op: int, body: torch.Tensor) -> None:
        """Rank 0: announce an op and its int64 body (its length first, so receivers can size it)."""
        head = torch.tensor([op, body.numel(), 0, 0], dtype=torch.int64, device=self.device)
        self.broadcast(head)
        if body.numel():
            self.broadcast(body.to(self.device))

    def recv_header(self) -> tuple[int, list[int]]:
        head = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self.broadcast(head)
        op, n = int(head[0]), int(head[1])
        if n == 0:
            return op, []
        body = torch.empty(n, dtype=torch.int64, device=self.device)
        self.broadcast(body)
        return op, body.tolist()

    def close(self) -> None:
        # Shut the group down explicitly where the backend supports it; otherwise drop references.
        shutdown = getattr(self.pg, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - a broken group may refuse a clean shutdown
                pass
        self.pg = None  # type: ignore[assignment]
