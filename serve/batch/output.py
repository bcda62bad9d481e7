"""Where a batch run's results go, so that the job never deletes or overwrites what it did not write.

A local `--output` directory is the run's own: empty or new, or holding an earlier FA Pool run
(its marker file, MARKER, says so). Ray Data writes into a fresh staging folder inside it
(`.run-<id>`, named in the marker before anything is written), and only when the whole dataset
is written are its files moved up beside the marker, which then says "complete". A run killed
midway leaves the marker at "incomplete": running the same command again removes what that run
wrote (the staging folder and the files the marker names, nothing else) and starts over. A
directory that holds anything without the marker is refused, and a finished run is never replaced.

An output URI (`s3://...`) must not exist yet (remote data is never replaced).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from typing import Any

MARKER = ".fapool-batch"


def read_marker(output: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(output, MARKER)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def check_output(output: str) -> str:
    """Raises ValueError unless `output` may take this run; returns what a run there will do."""
    if not os.path.exists(output):
        return "new"
    if not os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a file; give a directory for the result files")
    marker = read_marker(output)
    others = sorted(n for n in os.listdir(output) if n != MARKER)
    if marker is None:
        if others:
            raise ValueError(f"--output {output!r} holds files that no FA Pool batch run wrote (e.g. {others[0]!r}); "
                             "give an empty or new directory: the job never deletes or overwrites what it did not write")
        return "new"
    if marker.get("state") == "complete":
        raise ValueError(f"--output {output!r} holds a finished run (input {marker.get('input')!r}, "
                         f"{len(marker.get('files', []))} files); give a new directory, or delete that one first")
    return "finish"  # an incomplete run of ours: it is started again


def _write_marker(output: str, marker: dict[str, Any]) -> None:
    tmp = os.path.join(output, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(output, MARKER))  # atomic: a kill leaves the old marker or the new


def begin(output: str, input_path: str) -> str:
    """Claim `output` (checked by `check_output`) for a run; returns the staging folder Ray Data
    writes into. An incomplete earlier run's files are removed first: only those its marker names."""
    check_output(output)
    os.makedirs(output, exist_ok=True)
    earlier = read_marker(output)
    if earlier is not None:  # incomplete (check_output refused a complete one)
        for name in earlier.get("files", []):
            path = os.path.join(output, name)
            if os.path.isfile(path):
                os.remove(path)
        for name in earlier.get("staging", []):
            shutil.rmtree(os.path.join(output, name), ignore_errors=True)
    staging = f".run-{uuid.uuid4().hex[:12]}"
    _write_marker(output, {"state": "incomplete", "input": input_path, "started": time.time(),
                           "staging": [staging], "files": []})
    return os.path.join(output, staging)


def finish(output: str, staging_path: str) -> list[str]:
    """Move the run's files from staging beside the marker and mark the run complete."""
    marker = read_marker(output) or {}
    names = sorted(n for n in os.listdir(staging_path) if n.endswith(".json"))
    clash = [n for n in names if os.path.exists(os.path.join(output, n))]
    if clash:
        raise RuntimeError(f"{output}/{clash[0]} appeared during the run; the results stay in {staging_path}")
    # Named first, so that a kill while moving leaves every moved file known to the next run.
    _write_marker(output, {**marker, "files": names})
    for n in names:
        os.replace(os.path.join(staging_path, n), os.path.join(output, n))
    shutil.rmtree(staging_path)  # ours: whatever else Ray Data left there
    _write_marker(output, {**marker, "state": "complete", "files": names, "staging": [], "finished": time.time()})
    return names
