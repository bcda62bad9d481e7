"""The batch job's view of the pool while it runs: the largest pool seen, scale events, and how
many requests the bases ran with their KV spread over the pool."""
from __future__ import annotations

import threading
import time
from typing import Any

POLL_EVERY_S = 0.5


class PoolWatcher:
    """Polls the controller in the background: the largest pool seen, scale events, and how many
    requests the bases ran with their KV spread over the pool."""

    def __init__(self, cluster: Any, every_s: float = POLL_EVERY_S) -> None:
        import ray

        self.cluster, self.every_s, self.peak_size = cluster, every_s, 0
        self._counts = lambda: ray.get(cluster.controller.scale_counts_total.remote())
        self._pooled = lambda: sum(s.pooled_total for s in ray.get([b.stats.remote() for b in cluster.bases]))
        self._start_counts, self._start_pooled = self._counts(), self._pooled()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pool-watcher")

    def _poll(self) -> Any:
        st = self.cluster.status()
        self.peak_size = max(self.peak_size, st.size)
        return st

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - a missed poll is not worth failing the job
                pass

    def __enter__(self) -> "PoolWatcher":
        self._since_s = time.time()
        self._poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        st = self._poll()
        # Events also catch a pool that grew and shrank between two polls.
        self.peak_size = max([self.peak_size] + [e.to_size for e in st.events if e.time_s >= self._since_s])
        end = self._counts()
        return {"peak_size": self.peak_size, "final_size": st.size, "final_target": st.target,
                "scale_ups": end["up"] - self._start_counts["up"],
                "scale_downs": end["down"] - self._start_counts["down"],
                "pooled_requests": self._pooled() - self._start_pooled}  # also counts other clients' requests
