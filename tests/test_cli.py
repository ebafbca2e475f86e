"""The command line, end to end on a tiny corpus in a temp folder, and every bad input's one-line error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_corpus

from knnformer.cli import main
from knnformer.run.checkpoint import latest_checkpoint


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def prepared(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus", num_docs=10)
    code, out, _ = run(capsys, "prepare", corpus, "--out", tmp_path / "store", "--tokenizer", "bpe",
                       "--vocab-size", "300", "--valid-fraction", "0.2", "--test-fraction", "0.2")
    assert code == 0 and "datastore" in out
    return tmp_path / "store"


def test_end_to_end(tmp_path, capsys, prepared):
    run_dir = tmp_path / "run"
    code, out, _ = run(capsys, "train", prepared, "--out", run_dir, "--config", "tiny", "--set", "train.steps=20")
    assert code == 0 and "trained to step 20" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20 and "valid_bpb" in rows[-1]
    code, out, _ = run(capsys, "evaluate", run_dir, "--json")
    result = json.loads(out)
    assert code == 0 and set(result) >= {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "split", "stride"}
    assert result["split"] == "valid" and result["stride"] == 32 and result["bits_per_byte"] > 0
    code, out, _ = run(capsys, "evaluate", run_dir, "--split", "test", "--stride", "8")
    assert code == 0 and "sliding (context 32, stride 8)" in out
    code, out, _ = run(capsys, "generate", run_dir, "--prompt", "the model", "--max-new-tokens", "20", "--seed", "1")
    assert code == 0 and out.startswith("the model") and len(out) > len("the model\n")
    # resume with more steps continues the same run
    code, out, _ = run(capsys, "train", prepared, "--out", run_dir, "--resume", "--set", "train.steps=25")
    assert code == 0 and "trained to step 25" in out


def test_bad_inputs_give_one_line_errors(tmp_path, capsys, prepared):
    def error(*argv) -> str:
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("knnformer: error: ") and "Traceback" not in err
        return err

    assert "does not exist" in error("prepare", tmp_path / "missing", "--out", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    assert "no files match" in error("prepare", tmp_path / "empty", "--out", tmp_path / "x")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.dat").write_bytes(b"\x00\x01\x02")
    assert "is binary" in error("prepare", tmp_path / "bin", "--out", tmp_path / "x", "--strict")
    assert "already exists" in error("prepare", tmp_path / "corpus", "--out", prepared)
    assert "not a datastore" in error("train", tmp_path / "corpus", "--out", tmp_path / "r")
    assert "unknown config key 'train.nope'" in error("train", prepared, "--out", tmp_path / "r", "--config", "tiny",
                                                      "--set", "train.nope=1")
    assert "has no checkpoint" in error("evaluate", tmp_path / "corpus")
    run_dir = tmp_path / "run"
    assert run(capsys, "train", prepared, "--out", run_dir, "--config", "tiny", "--set", "train.steps=2")[0] == 0
    long_prompt = "the model reads " * 40
    assert "longer than the model's context" in error("generate", run_dir, "--prompt", long_prompt)
    # a datastore built by another tokenizer is refused by evaluate and by resume
    other = tmp_path / "other"
    assert run(capsys, "prepare", tmp_path / "corpus", "--out", other, "--tokenizer", "bytes")[0] == 0
    assert "another tokenizer" in error("evaluate", run_dir, "--datastore", other)
    assert "another tokenizer" in error("train", other, "--out", run_dir, "--resume")
    # a corrupt checkpoint
    weights = latest_checkpoint(run_dir) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "corrupt or truncated" in error("evaluate", run_dir)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, prepared):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "knnformer.cli", "-q", "train", str(prepared), "--out", str(run_dir),
           "--config", "tiny", "--set", "train.steps=100000", "--set", "train.checkpoint_interval=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "Traceback" not in err
    step = int(latest_checkpoint(run_dir).name.split("-")[1])
    assert step >= 5
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[-1]["step"] == step


def test_console_script_is_installed():
    out = subprocess.run(["knnformer", "--version"], capture_output=True, text=True,
                         env={**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]})
    assert out.returncode == 0 and out.stdout.startswith("knnformer ")
