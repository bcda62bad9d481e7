"""serve/batch/output.py on a real filesystem: the batch job never deletes or overwrites what it
did not write. A real run killed with SIGKILL and run again is tests/serve/test_batch_job.py."""
from __future__ import annotations

import json

import pytest

from serve.batch.job import main
from serve.batch.output import MARKER, begin, check_output, finish, read_marker


def user_files(d):
    (d / "config.json").write_text('{"mine": true}')
    (d / "keep.json").mkdir()
    (d / "keep.json" / "inside.txt").write_text("mine too")


def test_a_folder_with_a_users_files_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    user_files(out)
    with pytest.raises(ValueError, match="no FA Pool batch run wrote"):
        check_output(str(out))
    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["--input", str(tmp_path / "in.jsonl"), "--output", str(out)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert (out / "config.json").read_text() == '{"mine": true}' and (out / "keep.json" / "inside.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.json"]


def test_a_run_stages_then_completes_and_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    staging = begin(str(out), "/in.jsonl")
    assert read_marker(str(out))["state"] == "incomplete"
    (out / staging.rsplit("/", 1)[1]).mkdir()  # Ray Data's write_json creates it
    for i in range(2):  # and leaves its files there
        (out / staging.rsplit("/", 1)[1] / f"{i}_000000_000000.json").write_text(json.dumps({"line": i}))
    names = finish(str(out), staging)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, *names])
    assert read_marker(str(out))["state"] == "complete"
    with pytest.raises(ValueError, match="finished run"):
        check_output(str(out))


def test_an_incomplete_run_is_started_again_removing_only_its_own_files(tmp_path):
    out = tmp_path / "out"
    staging = begin(str(out), "/in.jsonl")
    (out / staging.rsplit("/", 1)[1]).mkdir()
    (out / staging.rsplit("/", 1)[1] / "0_000000_000000.json").write_text("{}")  # killed midway
    (out / "notes.txt").write_text("added by the user meanwhile")
    assert check_output(str(out)) == "finish"
    staging2 = begin(str(out), "/in.jsonl")
    assert staging2 != staging and not (out / staging.rsplit("/", 1)[1]).exists()
    assert (out / "notes.txt").read_text() == "added by the user meanwhile"
    assert read_marker(str(out))["staging"] == [staging2.rsplit("/", 1)[1]]
