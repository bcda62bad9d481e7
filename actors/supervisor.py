"""`Supervisor`: owns one cluster's controller and base actors and keeps them alive.

Ownership decides what dies with what. The supervisor runs in the process that started the
cluster (a Serve ingress replica, a job's driver) and creates the controller and the bases itself,
so a controller's death never takes the bases down, and the starting process's death (`serve
shutdown`, a job that exits) takes all of them down. A `detached` cluster outlives its starter:
only an explicit `shutdown` stops it.

Two mechanisms bring actors back. A crashed process is restarted by Ray (`max_restarts=-1`) under
the same handle; an actor that is dead for good (`ray.kill`) is created again by the supervisor.
Either way the newcomer answers `ping` with a new incarnation, and the supervisor has it rejoin:
a controller gets `attach(bases)`, a base is announced with `controller.base_replaced`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray

from actors.base_actor import BaseActor
from actors.config import NAMESPACE, ClusterConfig
from actors.controller import PoolController

log = logging.getLogger(__name__)
PING_TIMEOUT_S = 5.0  # a ping is answered on the actor's event loop, never behind an engine step


def base_name(cluster: str, base_id: int) -> str:
    return f"{cluster}-base-{base_id}"


def is_base_name(name: str) -> bool:
    return "-base-" in name


def dead_for_good(handle: Any) -> bool:
    """Whether Ray will not restart this actor (killed with `ray.kill`, or out of restarts)."""
    try:
        from ray._private.state import actors

        return actors(actor_id=handle._actor_id.hex()).get("State") == "DEAD"
    except Exception:  # noqa: BLE001 - unknown: treat as restarting, ask again next round
        return False


class Supervisor:
    def __init__(self, cfg: ClusterConfig, name: str, detached: bool = False) -> None:
        self.cfg, self.name, self.detached = cfg, name, detached
        # Every setting reaches the actors in `cfg` (no environment variable is forwarded).
        self._opts: dict[str, Any] = {"namespace": NAMESPACE, "max_restarts": -1, "max_task_retries": 0,
                                      **({"lifetime": "detached"} if detached else {})}
        self.controller: Any = None
        self.bases: list[Any] = []
        self.healthy: list[bool] = []  # per base: answered its latest ping
        self.drain_deadline_s: float | None = None  # from the controller: the ingress drains
        self._incarnations: dict[str, str] = {}  # role -> incarnation seen last
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> "Supervisor":
        """Create the controller and bases, wait until they are ready, then watch them."""
        from actors.capacity import on_cuda

        self.controller = self._new_controller()
        opts = self.cfg.actor_options(on_cuda(self.cfg))
        self.bases = [self._new_base(i, opts) for i in range(self.cfg.num_base_actors)]
        self.healthy = [True] * len(self.bases)
        ray.get(self.controller.attach.remote(self.bases))
        for role, (_, inc) in zip(self._roles(), ray.get([h.ping.remote() for h in self.bases])):
            self._incarnations[role] = inc
        self._incarnations["controller"] = ray.get(self.controller.ping.remote())[0]
        self._thread = threading.Thread(target=self._watch, daemon=True, name=f"supervisor-{self.name}")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (the actors keep running)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def shutdown(self) -> None:
        """Stop watching, then stop the pool members, the controller and the bases."""
        self.stop()
        try:
            ray.get(self.controller.shutdown.remote(), timeout=30)
        except Exception as e:  # noqa: BLE001 - a dead controller took its members along
            log.debug("controller shutdown: %s", e)
        for h in (self.controller, *self.bases):
            try:
                ray.kill(h)
            except Exception:  # noqa: BLE001 - already gone
                pass

    # ---- creating actors ------------------------------------------------------------------
    def _new_controller(self) -> Any:
        return (ray.remote(PoolController)
                .options(name=self.name, num_cpus=0, max_concurrency=1000, **self._opts)
                .remote(self.cfg))

    def _new_base(self, base_id: int, opts: dict[str, Any]) -> Any:
        return (ray.remote(BaseActor)
                .options(name=base_name(self.name, base_id), max_concurrency=1000, **opts, **self._opts)
                .remote(base_id, self.cfg))

    def _roles(self) -> list[str]:
        return [f"base-{i}" for i in range(len(self.bases))]

    # ---- watching -------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.supervise_every_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - keep watching; the next round retries
                log.exception("supervisor %s", self.name)

    def check(self) -> None:
        """One round: ping everyone; have newcomers rejoin; create again the dead for good."""
        handles = [self.controller, *self.bases]
        refs = [h.ping.remote() for h in handles]
        ray.wait(refs, num_returns=len(refs), timeout=PING_TIMEOUT_S)
        answers = []
        for ref in refs:
            try:
                answers.append(ray.get(ref, timeout=0))
            except ray.exceptions.GetTimeoutError:
                answers.append(None)  # busy or restarting: no verdict this round
            except Exception as e:  # noqa: BLE001 - RayActorError: died (maybe restarting)
                answers.append(e)
        bases_ok = self._check_bases(answers[1:])
        self._check_controller(answers[0], bases_ok)

    def _check_bases(self, answers: list[Any]) -> bool:
        from actors.capacity import on_cuda

        all_ok = True
        for i, ans in enumerate(answers):
            role = f"base-{i}"
            if isinstance(ans, tuple):
                if ans[1] != self._incarnations.get(role):
                    log.warning("supervisor %s: %s is back; rejoining the pool", self.name, role)
                    ray.get(self.controller.base_replaced.remote(i, self.bases[i]), timeout=120)
                    self._incarnations[role] = ans[1]
                self.healthy[i] = True
                continue
            all_ok = False
            if isinstance(ans, Exception):
                if self.healthy[i]:
                    log.warning("supervisor %s: %s died: %s", self.name, role, ans)
                    self.controller.base_down.remote(i)
                self.healthy[i] = False
                if dead_for_good(self.bases[i]):
                    log.warning("supervisor %s: creating %s again", self.name, role)
                    self.bases[i] = self._new_base(i, self.cfg.actor_options(on_cuda(self.cfg)))
        return all_ok

    def _check_controller(self, ans: Any, bases_ok: bool) -> None:
        if isinstance(ans, tuple):
            incarnation, attached, self.drain_deadline_s = ans
            if (incarnation != self._incarnations.get("controller") or not attached) and bases_ok:
                log.warning("supervisor %s: the controller is back; attaching the bases", self.name)
                ray.get(self.controller.attach.remote(self.bases), timeout=120)
                self._incarnations["controller"] = incarnation
        elif isinstance(ans, Exception) and dead_for_good(self.controller):
            log.warning("supervisor %s: the controller died for good; creating it again", self.name)
            self._wait_name_free(self.name)
            self.controller = self._new_controller()
            self._incarnations.pop("controller", None)

    @staticmethod
    def _wait_name_free(name: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                return
            time.sleep(0.1)
