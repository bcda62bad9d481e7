"""Offline batch generation: a JSONL file of prompts in, a JSONL file of completions out.

    ray job submit --working-dir . -- python -m serve.batch --input in.jsonl --output out.jsonl

An input line is `{"prompt": str}` or `{"prompt_token_ids": [int]}` with optional `id`,
`max_tokens` (64), `temperature` (0: greedy), `top_p`, `top_k`, `seed`, `stop`, `ignore_eos`.
Each input line gives one output line, in input order: `{"id", "text", "token_ids",
"finish_reason", "usage"}`, or `{"id", "error": {"message", "type"}}` for a line the job or the
engine refuses; a bad line never stops the job. The last stdout line is `SUMMARY {json}`.

The job joins the cluster's running controller (e.g. one `fapool serve` started), else starts
one from the flags and shuts it down at the end. Exit codes: 0 done, 1 some requests hit a server
error (an actor died), 2 bad arguments (a missing input file, a bad flag value).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from fapool.errors import ErrorType, RequestError
from fapool.policy import DEFAULT_CURVE, MAX_POOL
from fapool.sampling import SamplingParams

CLUSTER_FLAGS = ("model", "device", "base_actors", "max_pool", "pool_curve", "pool_cooldown_s", "accelerator_type")
OVERLOAD_RETRY_S = 300.0  # how long a request refused with "overloaded" keeps retrying
POLL_EVERY_S = 0.5


class BatchLine(BaseModel):
    """One input line. Types are checked here, values by `SamplingParams` and the engine."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: Union[str, int, None] = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class BatchRequest:
    index: int  # position in the output
    line_no: int
    id: Any
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams


def error_record(rid: Any, message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"id": rid, "error": {"message": message, "type": kind}}


def parse_line(index: int, line_no: int, line: str) -> BatchRequest | dict[str, Any]:
    """A request, or the error record for a line that can never run. `id` defaults to `line_no`."""
    where = f"line {line_no}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return error_record(line_no, f"{where}: not valid JSON ({e})")
    rid = obj.get("id", line_no) if isinstance(obj, dict) else line_no
    try:
        body = BatchLine.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        return error_record(rid, f"{where}: {loc + ': ' if loc else ''}{first['msg']}")
    rid = body.id if body.id is not None else line_no
    if (body.prompt is None) == (body.prompt_token_ids is None):
        return error_record(rid, f"{where}: give exactly one of prompt (a string) or prompt_token_ids (a list of ints)")
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    try:
        params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, seed=body.seed, stop=tuple(stop), ignore_eos=body.ignore_eos)
    except ValueError as e:
        return error_record(rid, f"{where}: {e}")
    return BatchRequest(index, line_no, rid, body.prompt, body.prompt_token_ids, params)


def read_requests(path: Path) -> list[BatchRequest | dict[str, Any]]:
    """Parse every non-blank line; raises `ValueError` for a missing file."""
    if not path.is_file():
        raise ValueError(f"--input {str(path)!r}: no such file; give the path of a JSONL file "
                         "(relative paths resolve in the job's working directory)")
    items: list[BatchRequest | dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                items.append(parse_line(len(items), line_no, line))
    return items


class OrderedWriter:
    """Writes records in input order as they complete out of order."""

    def __init__(self, f: TextIO) -> None:
        self.f, self.next, self.pending = f, 0, {}

    def put(self, index: int, record: dict[str, Any]) -> None:
        self.pending[index] = record
        while self.next in self.pending:
            self.f.write(json.dumps(self.pending.pop(self.next)) + "\n")
            self.next += 1


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


def generate_one(cluster: Any, req: BatchRequest) -> dict[str, Any]:
    delay_s, deadline = 0.1, time.monotonic() + OVERLOAD_RETRY_S
    while True:
        try:
            g = cluster.generate(req.prompt, req.params, prompt_token_ids=req.prompt_token_ids)
        except RequestError as e:
            if e.type.retryable and time.monotonic() < deadline:
                time.sleep(delay_s)
                delay_s = min(2 * delay_s, 2.0)
                continue
            if e.type is ErrorType.INVALID_REQUEST:
                return error_record(req.id, f"line {req.line_no}: {e}")
            return error_record(req.id, f"line {req.line_no}: {e}", "server_error")
        except Exception as e:  # noqa: BLE001 - an actor died: record it, go on with the rest
            return error_record(req.id, f"{type(e).__name__}: {e}", "server_error")
        return {"id": req.id, "text": g.text, "token_ids": list(g.token_ids), "finish_reason": g.finish_reason,
                "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens}}


def run_batch(cluster: Any, items: list, out: TextIO, concurrency: int) -> dict[str, Any]:
    """Run every request, `concurrency` at a time; write results in order; return the counts."""
    from tqdm import tqdm

    writer = OrderedWriter(out)
    counts = {"requests": len(items), "ok": 0, "errors": 0, "server_errors": 0,
              "prompt_tokens": 0, "completion_tokens": 0}
    bar = tqdm(total=len(items), file=sys.stderr, unit="req", mininterval=1.0)

    def record(index: int, rec: dict[str, Any]) -> None:
        if "error" in rec:
            counts["errors"] += 1
            counts["server_errors"] += rec["error"]["type"] == "server_error"
        else:
            counts["ok"] += 1
            counts["prompt_tokens"] += rec["usage"]["prompt_tokens"]
            counts["completion_tokens"] += rec["usage"]["completion_tokens"]
        writer.put(index, rec)
        bar.update(1)

    t0 = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="batch")
    try:
        futures = {pool.submit(generate_one, cluster, it): it.index for it in items if isinstance(it, BatchRequest)}
        for index, it in enumerate(items):
            if not isinstance(it, BatchRequest):
                record(index, it)
        for f in as_completed(futures):
            record(futures[f], f.result())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C, don't run the rest
        bar.close()
    wall_s = time.monotonic() - t0
    counts.update(wall_s=round(wall_s, 3), tokens_per_s=round(counts["completion_tokens"] / max(wall_s, 1e-9), 1))
    return counts


def cluster_config(args: argparse.Namespace) -> Any:
    """The `ClusterConfig` of the cluster flags, validated as `fapool serve` validates them."""
    from serve.options import ServeOptions

    try:
        return ServeOptions(**{k: getattr(args, k) for k in CLUSTER_FLAGS}).cluster_config()
    except ValidationError as e:
        err = e.errors()[0]
        flag = "--" + "-".join(str(x) for x in err["loc"]).replace("_", "-")
        raise ValueError(f"{flag}: {err['msg'].removeprefix('Value error, ')}") from None


def open_cluster(args: argparse.Namespace, cfg: Any) -> tuple[Any, bool]:
    """The running controller's cluster, or a new one; and whether this job started it."""
    import ray

    from actors.cluster import Cluster, connect
    from actors.config import CONTROLLER_NAME, NAMESPACE

    connect(args.address)
    try:
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return Cluster.start(cfg, name=CONTROLLER_NAME, detached=args.keep_cluster), True
    print("serve.batch: using the running controller; cluster flags (--model, --device, ...) are ignored",
          file=sys.stderr)
    ray.get(controller.start.remote())  # idempotent: makes sure its bases exist
    return Cluster(controller), False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="JSONL file of requests")
    p.add_argument("--output", required=True, type=Path, help="JSONL file of results (overwritten)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--keep-cluster", action="store_true", help="leave a controller this job started running")
    g = p.add_argument_group("cluster, as for `fapool serve` (used only when no controller is running)")
    g.add_argument("--model", default="tiny")
    g.add_argument("--device", default="auto")
    g.add_argument("--base-actors", type=int, default=1)
    g.add_argument("--max-pool", type=int, default=MAX_POOL)
    g.add_argument("--pool-curve", default=DEFAULT_CURVE)
    g.add_argument("--pool-cooldown-s", type=float, default=30.0)
    g.add_argument("--accelerator-type", default=None)
    return p.parse_args(argv)


def _exit_on_sigterm(*_: Any) -> None:
    # `ray job stop` sends SIGTERM first: unwind, so a controller this job started is shut down.
    raise SystemExit(128 + signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.concurrency < 1:
            raise ValueError(f"--concurrency {args.concurrency}; use at least 1")
        if not args.output.parent.is_dir():
            raise ValueError(f"--output {str(args.output)!r}: no directory {str(args.output.parent)!r}; "
                             "create it first")
        cfg = cluster_config(args)
        items = read_requests(args.input)
    except ValueError as e:
        print(f"serve.batch: error: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    cluster, owned = open_cluster(args, cfg)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # after ray.init, which installs its own
    try:
        startup_s = time.monotonic() - t0
        with args.output.open("w", encoding="utf-8") as out, PoolWatcher(cluster) as watcher:
            summary = run_batch(cluster, items, out, args.concurrency)
        summary.update(startup_s=round(startup_s, 3), controller="started" if owned else "existing",
                       pool=watcher.summary())
    finally:
        if owned and not args.keep_cluster:
            cluster.shutdown()
    sys.stderr.flush()
    sys.stdout.write("SUMMARY " + json.dumps(summary) + "\n")
    sys.stdout.flush()
    return 1 if summary["server_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
