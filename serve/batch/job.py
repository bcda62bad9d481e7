"""Offline batch generation on Ray Data: a JSON-lines file of prompts in, JSON-lines files of results out.

    ray job submit --working-dir . -- python -m serve.batch --input /shared/in.jsonl --output /shared/out

Paths. `--input` is one file, `--output` a directory; each is an absolute path or a URI that Ray
Data can read and write (`s3://bucket/key`, `gs://...`, a shared filesystem's path). On a cluster
of several nodes a local path must be on a filesystem every node mounts. A relative path is
refused: under `ray job submit --working-dir` the job runs in a copy of the working directory
inside Ray's cache, where a relative path would silently land. The output directory is created
if needed and must be empty, new, or hold an earlier run of this job (serve/batch/output.py): a
finished run is never replaced, an interrupted one is started again, anything else is refused.
An output URI must not exist yet: remote data is never replaced.
Where the output went is printed at the end, and is `output` in the summary.

Input lines: the body of `POST /generate` (`{"prompt": str}` or `{"prompt_token_ids": [int]}`,
`max_tokens` (64), `temperature`, `top_p`, `top_k`, `seed`, `stop`, `stop_token_ids`, `ignore_eos`,
the penalties, `logit_bias`, `min_tokens`) with an optional `id` (a string or an integer; use one
type per file), and one difference: `temperature` defaults to 0 (greedy) so a run is reproducible.
Blank lines are skipped.

Output: one record per non-blank input line, written by Ray Data's `write_json` as several
`*.json` files; read in file-name order they are in input order. Every record has `line` (the
input's 1-based line number: the key that matches it to its input) and `id` (as given, else
null), then either `text`, `token_ids`, `finish_reason`, `usage` with `error: null`, or `error:
{"message", "type"}` with the others null; `type` is "invalid_request" (fix the line),
"overloaded" (the cluster stayed full for `--retry-s`; such a line is retried with backoff until
then) or "internal" (the server failed). A bad line never stops the job. Progress goes to stderr;
the last stdout line is `SUMMARY {json}`, with the counts, failures by type and retries.

The job joins the cluster's running controller (e.g. one that `--keep-cluster` left), else starts
one from the cluster flags (those of `fapool serve`) and shuts it down at the end. Exit codes:
0 done, 1 some lines failed for a server reason ("internal" or "overloaded"), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from serve.batch.output import begin, check_output, finish
from serve.batch.watch import PoolWatcher
from serve.options import ClusterOptions, add_flags, options_from

OVERLOAD_RETRY_S = 300.0  # how long a line refused as "overloaded" keeps being retried


def checked_path(flag: str, value: str) -> str:
    """`value` if it is a URI or an absolute path; raises `ValueError` naming the fix otherwise."""
    if "://" in value:
        return value
    if not os.path.isabs(value):
        raise ValueError(f"{flag} {value!r} is a relative path; give an absolute path (on a filesystem every "
                         "node sees) or a URI such as s3://bucket/key: under `ray job submit --working-dir` "
                         "a relative path resolves inside Ray's copy of the working directory")
    return os.path.normpath(value)


def check_local_paths(input_path: str, output_path: str) -> None:
    if "://" not in input_path and not os.path.isfile(input_path):
        raise ValueError(f"--input {input_path!r}: no such file; give the path of a JSON-lines file")
    if "://" in output_path:
        check_new_uri(output_path)
        return
    check_output(output_path)  # serve/batch/output.py: what a local output directory may hold


def check_new_uri(uri: str) -> None:
    """An output URI must not exist yet: what is under a remote prefix cannot be checked file by
    file as a local directory is, so the job never replaces it (Ray Data's overwrite would delete it)."""
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
        exists = filesystem.get_file_info(path).type != fs.FileType.NotFound
    except Exception:  # noqa: BLE001 - unknown scheme or no credentials here: Ray Data reports it when it writes
        return
    if exists:
        raise ValueError(f"--output {uri!r} already exists; give a new URI (the job never replaces remote data)")


def count_lines(input_path: str) -> int | None:
    """The progress bar's total: non-blank lines of a local input (None for a URI)."""
    if "://" in input_path:
        return None
    with open(input_path, "rb") as f:
        return sum(1 for line in f if line.strip())


def open_cluster(args: argparse.Namespace, cfg: Any) -> tuple[Any, bool]:
    """The running controller's cluster, or a new one; and whether this job started it."""
    import ray

    from actors.cluster import Cluster, connect
    from actors.config import CONTROLLER_NAME, NAMESPACE

    connect(args.address)
    try:
        ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return Cluster.start(cfg, name=CONTROLLER_NAME, detached=args.keep_cluster), True
    print("serve.batch: using the running controller; cluster flags (--model, --device, ...) are ignored",
          file=sys.stderr)
    return Cluster.join(CONTROLLER_NAME), False


def show_progress(tally: Any, total: int | None, stop: threading.Event) -> None:
    """A progress bar on stderr of the lines done, from the map actors' tally."""
    import ray
    from tqdm import tqdm

    with tqdm(total=total, file=sys.stderr, unit="line", mininterval=1.0) as bar:
        while True:
            stopping = stop.wait(1.0)
            try:
                bar.update(ray.get(tally.totals.remote()).get("requests", 0) - bar.n)
            except Exception:  # noqa: BLE001 - a missed update is not worth failing the job
                pass
            if stopping:
                return


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve.batch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="JSON-lines file: an absolute path or a URI")
    p.add_argument("--output", required=True, help="directory of the result files: an absolute path or a URI")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight per worker")
    p.add_argument("--workers", type=int, default=1, help="Ray Data map actors sending requests")
    p.add_argument("--retry-s", type=float, default=OVERLOAD_RETRY_S,
                   help="how long a line refused as overloaded keeps being retried")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--keep-cluster", action="store_true", help="leave a controller this job started running")
    add_flags(p.add_argument_group("cluster, as for `fapool serve` (used only when no controller is running)"),
              ClusterOptions)
    return p.parse_args(argv)


def checked_args(args: argparse.Namespace) -> Any:
    """The cluster config of valid arguments; raises `ValueError` naming the first bad one."""
    for flag in ("concurrency", "workers"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} {getattr(args, flag)}; use at least 1")
    if args.retry_s < 0:
        raise ValueError(f"--retry-s {args.retry_s}; use 0 (no retries) or more seconds")
    args.input, args.output = checked_path("--input", args.input), checked_path("--output", args.output)
    check_local_paths(args.input, args.output)
    return options_from(ClusterOptions, args).cluster_config()


def _exit_on_sigterm(*_: Any) -> None:
    # `ray job stop` sends SIGTERM first: unwind, so a controller this job started is shut down.
    raise SystemExit(128 + signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = checked_args(args)
    except ValueError as e:
        print(f"serve.batch: error: {e}", file=sys.stderr)
        return 2
    import ray

    from actors.config import CONTROLLER_NAME
    from serve.batch.data import Tally, ray_data_helpers_removed, run_pipeline, summary_counts

    t0 = time.monotonic()
    ray_started_here = not (args.address or os.environ.get("RAY_ADDRESS"))
    cluster, owned = open_cluster(args, cfg)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # after ray.init, which installs its own
    stop = threading.Event()
    try:
        startup_s = time.monotonic() - t0
        tally = Tally.remote()
        progress = threading.Thread(target=show_progress, args=(tally, count_lines(args.input), stop), daemon=True)
        progress.start()
        local = "://" not in args.output
        if local and check_output(args.output) == "finish":
            print(f"serve.batch: {args.output} holds an incomplete run; removing what it wrote and starting again",
                  file=sys.stderr)
        target = begin(args.output, args.input) if local else args.output
        with PoolWatcher(cluster) as watcher, ray_data_helpers_removed(ray_started_here):
            t1 = time.monotonic()
            run_pipeline(args.input, target, cluster_name=CONTROLLER_NAME, workers=args.workers,
                         concurrency=args.concurrency, retry_s=args.retry_s, tally=tally)
            wall_s = time.monotonic() - t1
        if local:
            finish(args.output, target)
        stop.set()
        progress.join()
        summary = summary_counts(ray.get(tally.totals.remote()))
        tokens_per_s = round(summary["completion_tokens"] / max(wall_s, 1e-9), 1)
        summary.update(wall_s=round(wall_s, 3), tokens_per_s=tokens_per_s, startup_s=round(startup_s, 3),
                       controller="started" if owned else "existing", output=args.output, pool=watcher.summary())
    finally:
        stop.set()
        if owned and not args.keep_cluster:
            cluster.shutdown()
    sys.stderr.flush()
    print(f"serve.batch: {summary['requests']} records written as JSON lines under {args.output}", flush=True)
    sys.stdout.write("SUMMARY " + json.dumps(summary) + "\n")
    sys.stdout.flush()
    server_failed = summary["errors_by_type"]["internal"] + summary["errors_by_type"]["overloaded"]
    return 1 if server_failed else 0

