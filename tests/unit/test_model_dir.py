"""Bad model directories fail at once, in one line that names the file and the fix."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fapool.weights import check_model_dir
from tests.helpers.checkpoints import make_llama_checkpoint, make_pickle_only_checkpoint, make_unknown_arch_checkpoint

FAPOOL = Path(sys.executable).parent / "fapool"


def test_pickle_only_dir_fails_fast_in_one_line(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even opened")  # no config.json either
    t0 = time.monotonic()
    r = subprocess.run([str(FAPOOL), "serve", "--model", str(tmp_path), "--device", "cpu", "--port", "1"],
                       capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0 and elapsed < 5, (r.returncode, elapsed)
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "pytorch_model.bin" in lines[0] and "safe_serialization=True" in lines[0]
    assert "config.json" not in lines[0].split(":")[0]  # the pickle is named before the missing config


def test_check_model_dir_names_the_file(tmp_path):
    good = make_llama_checkpoint(tmp_path / "good")
    check_model_dir(good)
    marker = tmp_path / "unpickled"
    pk = make_pickle_only_checkpoint(tmp_path / "pk", marker, filename="model.pt")
    with pytest.raises(ValueError, match="model.pt.*safetensors only"):
        check_model_dir(pk)
    assert not marker.exists()
    with pytest.raises(ValueError, match="no such model directory"):
        check_model_dir(tmp_path / "absent")
    (good / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        check_model_dir(good)
    (good / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        check_model_dir(good)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        check_model_dir(make_unknown_arch_checkpoint(tmp_path / "arch"))
