"""The batch job's input lines and arguments, without Ray: every bad line or flag is refused by
name before anything starts (the end-to-end job is `tests/serve/test_batch_job.py`)."""
import json

from fapool import SamplingParams
from serve.batch.job import main
from serve.batch.lines import BatchRequest, parse_line


def test_parse_line_defaults_and_errors():
    req = parse_line(3, json.dumps({"prompt": "hi"}))
    assert isinstance(req, BatchRequest) and (req.line, req.id) == (3, None)
    assert req.params == SamplingParams(max_tokens=64, temperature=0.0)  # greedy: the batch's one difference
    req = parse_line(4, json.dumps({"id": "x", "prompt_token_ids": [1, 2], "stop": "ab", "ignore_eos": True,
                                    "presence_penalty": 0.5}))
    assert req.prompt_token_ids == [1, 2] and req.params.stop == ("ab",) and req.params.ignore_eos
    assert req.params.presence_penalty == 0.5  # the fields of POST /generate, applied the same way
    cases = {
        "{bad": "not valid JSON",
        "[1, 2]": "a line must be a JSON object",
        '{"id": "a"}': "exactly one of prompt",
        '{"prompt": "a", "prompt_token_ids": [1]}': "exactly one of prompt",
        '{"prompt": "a", "max_tokens": 0}': "max_tokens",
        '{"prompt": "a", "max_tokens": "4"}': "max_tokens",
        '{"prompt": "a", "top_p": 0}': "top_p",
        '{"prompt": "a", "prompt_token_ids": null, "temprature": 1}': "temprature",
        '{"prompt_token_ids": [1, true]}': "prompt_token_ids",
        '{"prompt": "a", "stream": true}': "stream",
        '{"prompt": "a", "logprobs": 2}': "logprobs",
        '{"prompt": "a", "max_tokens": 2, "min_tokens": 3}': "min_tokens",
    }
    for line, want in cases.items():
        rec = parse_line(9, line)
        assert isinstance(rec, dict) and rec["error"]["type"] == "invalid_request" and rec["line"] == 9, line
        assert rec["error"]["message"].startswith("line 9: ") and want in rec["error"]["message"], rec


def test_bad_arguments_exit_2(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["--input", str(tmp_path / "nope.jsonl"), "--output", out]) == 2
    assert "nope.jsonl" in capsys.readouterr().err and not (tmp_path / "out").exists()
    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["--input", "in.jsonl", "--output", out]) == 2  # relative: would land in Ray's cache
    assert "relative path" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["--input", str(tmp_path / "in.jsonl"), "--output", out]) == 2  # never deletes other files
    assert "notes.txt" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "in.jsonl"), "--output", out + "2", "--max-pool", "40"]) == 2
    assert "--max-pool" in capsys.readouterr().err
    # A URI that exists is refused before anything starts: remote data is never replaced.
    assert main(["--input", str(tmp_path / "in.jsonl"), "--output", "file://" + out]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "out" / "notes.txt").exists()
