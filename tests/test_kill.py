"""kill -9 at random points of ``prepare --force``, ``index`` and a checkpoint write (issue 14): what is left is
the old artefact or the new one, never half of one, and the next run removes every temporary the killed process
left. One seed of each in the default run; more behind ``-m slow``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_corpus

from knnformer.cli import main
from knnformer.data.chunks import read_retrieval_manifest
from knnformer.data.datastore import Datastore
from knnformer.io import claim_folder
from knnformer.retrieval.live import open_index
from knnformer.retrieval.neighbours import load_neighbours
from knnformer.run.checkpoint import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SLOW_SEEDS = [pytest.param(s, marks=pytest.mark.slow) for s in range(1, 6)]


def temporaries(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def kill_while_writing(argv: list, watch: list[Path], seed: int, spread: float) -> bool:
    """Start ``knnformer ARGV``; once a temporary appears under ``watch`` (the write has begun), wait a random
    0..``spread`` seconds and kill -9 it. Returns whether it was killed (False: it finished first)."""
    rng = random.Random(seed)
    proc = subprocess.Popen([sys.executable, "-m", "knnformer.cli", "-q", *map(str, argv)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not temporaries(*watch):
        time.sleep(0.005)
    time.sleep(rng.uniform(0, spread))
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert killed or proc.returncode == 0, err
    return killed


@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", [0, *SLOW_SEEDS])
def test_kill_during_prepare_force(tmp_path, seed):
    old_corpus = make_corpus(tmp_path / "old", num_docs=4)
    new_corpus = make_corpus(tmp_path / "new", num_docs=40, words_per_doc=10000, seed=seed + 1)
    store = tmp_path / "store"
    assert main(["-q", "prepare", str(old_corpus), "--out", str(store)]) == 0
    old_sha = Datastore.open(store).manifest["corpus_sha256"]
    kill_while_writing(["prepare", new_corpus, "--out", store, "--force"], [tmp_path], seed, 0.15)
    # what every next writer (prepare, index, train) does first: take the folder, put back a datastore a kill
    # left aside, remove the temporaries of the dead process
    with claim_folder(store, "index"):
        assert not temporaries(tmp_path)
        reopened = Datastore.open(store)  # whole: its checks (sizes, tokens.bin's sha256) pass
        assert reopened.manifest["corpus_sha256"] == old_sha or len(reopened.doc_ids) == 40


@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", [0, *SLOW_SEEDS])
def test_kill_during_index(tmp_path, seed):
    store = tmp_path / "store"
    assert main(["-q", "prepare", str(make_corpus(tmp_path / "c", num_docs=20, words_per_doc=1000)),
                 "--out", str(store)]) == 0
    assert main(["-q", "index", str(store), "--embedder", "bytes-hash", "--k", "2", "--exclude-window", "64"]) == 0
    kill_while_writing(["index", store, "--embedder", "bytes-hash", "--k", "6", "--exclude-window", "64", "--force"],
                       [store], seed, 3.0)
    entries = read_retrieval_manifest(store)
    if "neighbours" in entries or "index" in entries:  # the old index (k=2) or the new one (k=6), whole
        nb = load_neighbours(store)  # the neighbours' sha256 matches the manifest
        assert nb.ids.shape[1] == entries["neighbours"]["k"] in (2, 6)
        assert open_index(Datastore.open(store)).index.ntotal == entries["index"]["num_vectors"]
    else:  # killed inside the few renames that swap the files in: the manifest names no index, none half-read
        with pytest.raises(ValueError, match="has no neighbours"):
            load_neighbours(store)
    assert main(["-q", "index", str(store), "--embedder", "bytes-hash", "--k", "2", "--exclude-window", "64"]) == 0
    assert not temporaries(store)


@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", [0, *SLOW_SEEDS])
def test_kill_during_a_checkpoint_write(tmp_path, seed):
    store = tmp_path / "store"
    assert main(["-q", "prepare", str(make_corpus(tmp_path / "c", num_docs=8)), "--out", str(store)]) == 0
    run = tmp_path / "run"
    killed = kill_while_writing(["train", store, "--out", run, "--config", "tiny", "--set", "train.steps=100000",
                                 "--set", "train.checkpoint_interval=1", "--set", "train.eval_interval=100000",
                                 "--set", "model.dim=64"], [run / "checkpoints"], seed, 0.05)
    assert killed
    found = list_checkpoints(run)
    for ckpt in found:  # every checkpoint in place is whole: checksums, weights, state and optimizer load
        load_checkpoint(ckpt, with_optimizer=True)
    if not found:  # killed while writing the very first one: nothing to resume, the run starts again
        assert main(["-q", "train", str(store), "--out", str(run), "--config", "tiny", "--set", "train.steps=1"]) == 0
        assert not temporaries(run)
        return
    step = int(found[-1].name.split("-")[1])
    assert main(["-q", "train", str(store), "--out", str(run), "--resume", "--set", f"train.steps={step + 1}"]) == 0
    assert not temporaries(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == step + 1
