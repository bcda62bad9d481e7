"""The batch job's Ray Data pipeline: input lines → `map_batches` against the base actors → JSON lines.

    read_binary_files(input) → flat_map(numbered lines) → repartition → map_batches(Generate) → write_json

The input is read whole and split into numbered lines (rather than `read_json`), so that a line
that is not valid JSON becomes an error record instead of failing the read, and every record
carries its input line number. Order is kept (`preserve_order`): the output files, in file-name
order, hold one record per non-blank input line, in input order.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

import pandas as pd
import ray

from fapool.errors import ErrorType
from serve.batch.lines import BatchRequest, parse_line, run_request

# Ray Data's tasks only move bytes: a small CPU share each, so that the job never waits for CPUs
# the base actors' engine threads are already using (they reserve none), and never deadlocks.
IO_CPUS = 0.1


@ray.remote(num_cpus=0)
class Tally:
    """The job's counts, added to by every map actor; the driver reads them for progress and summary."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def totals(self) -> dict[str, int]:
        return dict(self.counts)


def numbered_lines(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per non-blank line of a file: its 1-based line number and its text."""
    text = row["bytes"].decode("utf-8", errors="replace")
    return [{"line": n, "text": t} for n, t in enumerate(text.splitlines(), start=1) if t.strip()]


def count(record: dict[str, Any], retries: int) -> Counter:
    c = Counter(requests=1, retries=retries)
    if "error" in record:
        c["errors"] += 1
        c["errors." + record["error"]["type"]] += 1
    else:
        c["ok"] += 1
        c["prompt_tokens"] += record["usage"]["prompt_tokens"]
        c["completion_tokens"] += record["usage"]["completion_tokens"]
    return c


class Generate:
    """A Ray Data map actor: joins the running FA Pool cluster by its controller's name and runs a
    batch of lines through it, `concurrency` requests in flight at once."""

    def __init__(self, cluster_name: str, concurrency: int, retry_s: float, tally: Any) -> None:
        from actors.cluster import Cluster

        self.cluster = Cluster.join(cluster_name)
        self.threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="batch")
        self.retry_s, self.tally = retry_s, tally

    def _one(self, line: int, text: str) -> tuple[dict[str, Any], int]:
        item = parse_line(line, text)
        return run_request(self.cluster, item, self.retry_s) if isinstance(item, BatchRequest) else (item, 0)

    def __call__(self, batch: dict[str, Any]) -> pd.DataFrame:
        done = list(self.threads.map(self._one, [int(n) for n in batch["line"]], [str(t) for t in batch["text"]]))
        counts = Counter()
        for record, retries in done:
            counts.update(count(record, retries))
        ray.get(self.tally.add.remote(dict(counts)))  # before the batch counts as done
        # Every record has every column (null where it does not apply), as JSON lines of one table.
        return pd.DataFrame([{**EMPTY, **record} for record, _ in done], columns=list(EMPTY))


EMPTY = {"line": None, "id": None, "text": None, "token_ids": None, "finish_reason": None, "usage": None,
         "error": None}


def run_pipeline(input_path: str, output_path: str, *, cluster_name: str, workers: int, concurrency: int,
                 retry_s: float, tally: Any) -> None:
    """Run every line of `input_path` and write the records under the directory `output_path`."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.read_binary_files(input_path, num_cpus=IO_CPUS).flat_map(numbered_lines, num_cpus=IO_CPUS)
    # Blocks of a few batches each, so that every map actor gets work (one file is one block).
    batch_size = 4 * concurrency
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    ds = ds.map_batches(Generate, batch_size=batch_size, batch_format="numpy", num_cpus=0,
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        fn_constructor_kwargs={"cluster_name": cluster_name, "concurrency": concurrency,
                                               "retry_s": retry_s, "tally": tally})
    # A new folder (a URI checked to be new, or the run's own staging folder): never Ray Data's
    # OVERWRITE, which deletes the whole directory tree first.
    ds.write_json(output_path, mode=ray.data.SaveMode.ERROR, ray_remote_args={"num_cpus": IO_CPUS})


# Ray Data's detached helper actors (named, in namespaces of their own), which outlive the job.
RAY_DATA_HELPERS = {("_dataset_stats_actor", "datasets_stats_actor"),
                    ("_dataset_stats_summary_actor", "dataset_stats_summary_actor"),
                    ("AutoscalingCoordinator", "AutoscalingCoordinator"),
                    ("AutoscalingRequester", "AutoscalingRequester"),
                    ("DataUsageCollectionActor", "DataUsageCollectionActor"),
                    ("ActorLocationTracker", "ActorLocationTracker")}


def _named_actors() -> set[tuple[str, str]]:
    return {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)}


@contextmanager
def ray_data_helpers_removed(owned_ray: bool) -> Iterator[None]:
    """On exit, kill the Ray Data helpers that this run created in a cluster it joined (those that
    were there before belong to someone else, and a Ray this job started ends with it anyway)."""
    before = set() if owned_ray else _named_actors()
    try:
        yield
    finally:
        if not owned_ray:
            for namespace, name in (_named_actors() - before) & RAY_DATA_HELPERS:
                try:
                    ray.kill(ray.get_actor(name, namespace=namespace))
                except ValueError:  # gone meanwhile
                    pass


def summary_counts(totals: dict[str, int]) -> dict[str, Any]:
    """The summary's counts: failures by `ErrorType`, each type present (0 when none)."""
    out: dict[str, Any] = {k: totals.get(k, 0) for k in ("requests", "ok", "errors", "retries",
                                                          "prompt_tokens", "completion_tokens")}
    out["errors_by_type"] = {t.value: totals.get("errors." + t.value, 0) for t in ErrorType}
    return out
