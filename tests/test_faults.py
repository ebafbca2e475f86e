"""Knnformer under a hostile or careless user (issue 14): every case ends in a non-zero exit and one line that
names the file and the fix, earlier good artefacts stay intact, no code runs from a checkpoint, one writer per
folder. The artefacts are real (a prepared, indexed datastore; a trained run, plain and with retrieval); each
test breaks a copy of them. Kill -9 tests live in ``test_kill.py``."""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_corpus

from knnformer.cli import main
from knnformer.io import file_sha256, lock_path_of
from knnformer.run.checkpoint import latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def fails(capsys, *argv, names: str | Path | None = None, code: int | None = None) -> str:
    """Run the CLI; assert a non-zero exit, no traceback, one line on stderr naming ``names``; return the line."""
    rc, _, err = cli(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0 and (code is None or rc == code), (argv, rc, err)
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("knnformer: error: "), err
    if names is not None:
        assert str(names) in lines[0], lines[0]
    return lines[0]


def cli_process(*argv, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "knnformer.cli", "-q", *map(str, argv)], capture_output=True,
                          text=True, check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, **kw)


def rewrite_checksums(ckpt: Path) -> None:
    """What a tamperer does: recompute the checksums beside the files (they catch corruption, not tampering)."""
    files = sorted(p.name for p in ckpt.iterdir() if p.name != "checksums.json")
    (ckpt / "checksums.json").write_text(json.dumps({n: file_sha256(ckpt / n) for n in files}))


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".checked")}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A datastore indexed with bytes-hash (a real faiss index), a plain run and a retrieval run on it."""
    root = tmp_path_factory.mktemp("built")
    corpus = make_corpus(root / "corpus", num_docs=10)
    assert main(["-q", "prepare", str(corpus), "--out", str(root / "store"), "--valid-fraction", "0.2",
                 "--test-fraction", "0.1"]) == 0
    assert main(["-q", "index", str(root / "store"), "--embedder", "bytes-hash", "--k", "4",
                 "--exclude-window", "64"]) == 0
    common = ["--config", "tiny", "--set", "train.steps=4", "--set", "train.checkpoint_interval=2",
              "--set", "train.eval_interval=4"]
    assert main(["-q", "train", str(root / "store"), "--out", str(root / "run"), *common]) == 0
    assert main(["-q", "train", str(root / "store"), "--out", str(root / "rrun"), *common,
                 "--set", "retrieval.enabled=true", "--set", "retrieval.num_neighbours=2"]) == 0
    return root


@pytest.fixture
def art(built, tmp_path):
    """Copies of the built artefacts to break; the runs' records point at the copied datastore."""
    for name in ("corpus", "store", "run", "rrun"):
        shutil.copytree(built / name, tmp_path / name)
    for run in ("run", "rrun"):
        for record in (tmp_path / run).rglob("config.json"):
            data = json.loads(record.read_text())
            if "datastore" in data:
                data["datastore"]["path"] = str(tmp_path / "store")
                record.write_text(json.dumps(data, indent=2))
        for ckpt in (tmp_path / run / "checkpoints").iterdir():
            rewrite_checksums(ckpt)
    return tmp_path


# ---------------------------------------------------------------- no code runs from a checkpoint

class Planted:
    """A pickle that runs a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("target", ["state.pt", "optimizer.pt"])
def test_a_planted_pickle_is_refused_and_never_run(art, capsys, target):
    marker = art / "pwned"
    ckpt = latest_checkpoint(art / "run")
    if target == "state.pt":  # the old layout: state.pt instead of state.json + state.safetensors
        (ckpt / "state.json").unlink()
        (ckpt / "state.safetensors").unlink()
    torch.save(Planted(marker), ckpt / target)
    rewrite_checksums(ckpt)
    commands = [("train", art / "store", "--out", art / "run", "--resume", "--set", "train.steps=6")]
    if target == "state.pt":
        commands += [("evaluate", art / "run"), ("generate", art / "run", "--max-new-tokens", "4")]
    for argv in commands:
        line = fails(capsys, *argv, names=ckpt / target)
        assert "refused" in line and "pickle" in line
        assert not marker.exists()


def test_checkpoints_hold_no_pickle_and_old_ones_still_resume(art, capsys):
    ckpt = latest_checkpoint(art / "run")
    assert not (ckpt / "state.pt").exists() and (ckpt / "state.json").is_file()
    # a checkpoint written before (state.pt pickled with numpy's RNG arrays) loads, without running code
    state = load_checkpoint(ckpt)["state"]
    torch.save(state, ckpt / "state.pt")
    (ckpt / "state.json").unlink()
    (ckpt / "state.safetensors").unlink()
    rewrite_checksums(ckpt)
    old = load_checkpoint(ckpt)["state"]
    assert old["step"] == state["step"] and torch.equal(old["generator"], state["generator"])
    assert old["rng"]["python"] == state["rng"]["python"]
    assert np.array_equal(old["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert cli(capsys, "train", art / "store", "--out", art / "run", "--resume", "--set", "train.steps=6")[0] == 0


def test_weights_are_readable_by_a_teammate(art):
    for f in latest_checkpoint(art / "run").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f


# ---------------------------------------------------------------- one writer per folder

def hold(folder: Path, command: str) -> subprocess.Popen:
    """Another process that holds the folder's writer lock (as a running prepare, index or train does)."""
    code = ("import sys, time; from knnformer.io import claim_folder; c = claim_folder(sys.argv[1], sys.argv[2]); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), command], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_with_the_holders_pid(art, capsys):
    before = snapshot(art / "store")
    holder = hold(art / "store", "index")
    try:
        line = fails(capsys, "index", art / "store", "--embedder", "bytes-hash", names=f"pid {holder.pid}")
        assert "knnformer index" in line
        fails(capsys, "prepare", art / "corpus", "--out", art / "store", "--force", names=f"pid {holder.pid}")
        assert cli(capsys, "evaluate", art / "run")[0] == 0  # readers keep working
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(art / "store") == before
    # the OS released the lock of the killed holder: the next writer goes ahead
    assert cli(capsys, "index", art / "store", "--embedder", "bytes-hash", "--k", "4", "--exclude-window", "64")[0] == 0


@pytest.mark.multiprocess
def test_two_trainings_on_one_run_folder(art, capsys):
    """A real second ``train`` while one trains: refused, naming the trainer's pid; evaluate reads meanwhile."""
    proc = subprocess.Popen([sys.executable, "-m", "knnformer.cli", "-q", "train", str(art / "store"), "--out",
                             str(art / "run"), "--resume", "--set", "train.steps=100000"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    try:
        lock, deadline = lock_path_of(art / "run"), time.time() + 60
        while time.time() < deadline and f"pid {proc.pid}" not in (lock.read_text() if lock.exists() else ""):
            time.sleep(0.1)
        fails(capsys, "train", art / "store", "--out", art / "run", "--resume", names=f"pid {proc.pid}")
        fails(capsys, "train", art / "store", "--out", art / "run", "--config", "tiny", names=f"pid {proc.pid}")
        assert cli(capsys, "evaluate", art / "run")[0] == 0
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- folders that are not what they should be

def test_prepare_force_replaces_only_a_datastore(art, capsys):
    before = snapshot(art / "run")
    fails(capsys, "prepare", art / "corpus", "--out", art / "run", "--force", names=art / "run")
    assert snapshot(art / "run") == before
    assert cli(capsys, "prepare", art / "corpus", "--out", art / "store", "--force")[0] == 0  # a datastore: replaced


def test_train_refuses_a_datastore_as_its_run_folder(art, capsys):
    before = snapshot(art / "store")
    fails(capsys, "train", art / "store", "--out", art / "store", "--config", "tiny", names=art / "store")
    assert snapshot(art / "store") == before


@pytest.mark.parametrize("command", ["prepare", "train", "lra"])
def test_out_that_is_a_file(art, capsys, command):
    out = art / "a-file"
    out.write_text("mine")
    argv = {"prepare": ("prepare", art / "corpus", "--out", out, "--force"),
            "train": ("train", art / "store", "--out", out, "--config", "tiny"),
            "lra": ("lra", "listops", "--out", out)}[command]
    fails(capsys, *argv, names=out)
    assert out.read_text() == "mine"


def test_a_folder_that_cannot_be_written(art, capsys):
    # /sys refuses new entries even to root; a chmod 0555 folder refuses them to everyone else
    fails(capsys, "prepare", art / "corpus", "--out", "/sys/knnformer-store", names="/sys")
    fails(capsys, "train", art / "store", "--out", "/sys/knnformer-run", "--config", "tiny", names="/sys")
    if os.geteuid() != 0:
        locked = art / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        fails(capsys, "prepare", art / "corpus", "--out", locked / "store", names=locked)


def limited(limit_bytes: int):
    def preexec():  # a disk that fills: writes past the limit fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


def only_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def no_temporaries(*folders: Path) -> None:
    for folder in folders:
        left = [p for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
        assert not left, left


@pytest.mark.multiprocess
def test_a_full_disk_during_prepare_index_and_a_checkpoint(art):
    big = make_corpus(art / "big", num_docs=30, words_per_doc=4000)  # about 800 kB of tokens
    store_before, run_before = snapshot(art / "store"), snapshot(art / "run")
    r = cli_process("prepare", big, "--out", art / "store", "--force", preexec_fn=limited(200_000))
    assert r.returncode == 1 and "no space left" in only_line(r.stderr) and str(art / "store") in r.stderr
    r = cli_process("index", art / "store", "--embedder", "bytes-hash", "--k", "8", "--exclude-window", "64",
                    preexec_fn=limited(20_000))
    assert r.returncode == 1 and "no space left" in only_line(r.stderr)
    assert snapshot(art / "store") == store_before
    r = cli_process("train", art / "store", "--out", art / "run", "--resume", "--set", "train.steps=6",
                    preexec_fn=limited(60_000))
    assert r.returncode == 1 and "no space left" in only_line(r.stderr)
    kept = {k: v for k, v in snapshot(art / "run").items() if k.startswith("checkpoints/")}
    assert kept == {k: v for k, v in run_before.items() if k.startswith("checkpoints/")}
    no_temporaries(art / "store", art / "run", art)


# ---------------------------------------------------------------- contents checked, not only sizes

def test_a_manifest_missing_keys(art, capsys):
    manifest = json.loads((art / "store" / "manifest.json").read_text())
    del manifest["splits"]
    (art / "store" / "manifest.json").write_text(json.dumps(manifest))
    fails(capsys, "train", art / "store", "--out", art / "new", "--config", "tiny", names="manifest.json")
    fails(capsys, "evaluate", art / "run", names="manifest.json")


def test_tokens_overwritten_at_the_same_size(art, capsys):
    path = art / "store" / "tokens.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    np.random.default_rng(0).permutation(tokens).tofile(path)
    line = fails(capsys, "train", art / "store", "--out", art / "new", "--config", "tiny", names=path)
    assert "sha256" in line
    fails(capsys, "evaluate", art / "run", names=path)
    assert not (art / "new" / "checkpoints").exists()


def test_token_ids_at_or_above_the_vocabulary(art, capsys):
    path = art / "store" / "tokens.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[100] = 300  # the byte tokenizer's vocabulary is 256
    tokens.tofile(path)
    manifest = json.loads((art / "store" / "manifest.json").read_text())
    manifest["tokens_sha256"] = file_sha256(path)  # a careless user "fixing" the checksum
    (art / "store" / "manifest.json").write_text(json.dumps(manifest))
    line = fails(capsys, "train", art / "store", "--out", art / "new", "--config", "tiny", names=path)
    assert "token id 300" in line


def _set_neighbours(art: Path, ids: np.ndarray, fix_checksum: bool) -> Path:
    path = art / "store" / "neighbours.npy"
    np.save(path, ids)
    if fix_checksum:
        manifest = json.loads((art / "store" / "manifest.json").read_text())
        manifest["retrieval"]["neighbours"]["sha256"] = file_sha256(path)
        (art / "store" / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_random_or_out_of_range_neighbours(art, capsys):
    ids = np.load(art / "store" / "neighbours.npy")
    rng = np.random.default_rng(0)
    path = _set_neighbours(art, rng.integers(0, ids.max() + 1, ids.shape).astype(ids.dtype), fix_checksum=False)
    train = ("train", art / "store", "--out", art / "new", "--config", "tiny", "--set", "retrieval.enabled=true")
    assert "sha256" in fails(capsys, *train, names=path)
    _set_neighbours(art, np.full_like(ids, 10**6), fix_checksum=True)
    assert "outside" in fails(capsys, *train, names=path)
    fails(capsys, "evaluate", art / "rrun", names=path)


def test_neighbours_that_break_the_leakage_rule_fail_verify(art, capsys):
    ids = np.load(art / "store" / "neighbours.npy")
    leaky = ids.copy()
    leaky[:, 0] = np.minimum(np.arange(len(ids)) + 1, len(ids) - 1) % (ids.max() + 1)  # the next chunk: same doc
    _set_neighbours(art, leaky, fix_checksum=True)
    code, out, _ = cli(capsys, "verify", art / "store")
    assert code == 1 and any(ln.startswith("FAIL") and "leakage" in ln for ln in out.splitlines()), out


def test_a_truncated_index(art, capsys):
    path = art / "store" / "index.faiss"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fails(capsys, "generate", art / "rrun", "--max-new-tokens", "4", names=path)


def test_an_index_of_another_size(art, capsys):
    import faiss

    index = faiss.IndexFlatIP(faiss.read_index(str(art / "store" / "index.faiss")).d)
    index.add(np.zeros((3, index.d), dtype=np.float32))
    faiss.write_index(index, str(art / "store" / "index.faiss"))
    line = fails(capsys, "generate", art / "rrun", "--max-new-tokens", "4", names="index.faiss")
    assert "3 vectors" in line


def test_truncated_embeddings(art, capsys):
    path = art / "store" / "embeddings.f16"
    path.write_bytes(path.read_bytes()[:1000])
    fails(capsys, "evaluate", art / "rrun", names=path)


def test_a_truncated_optimizer_with_a_matching_checksum(art, capsys):
    ckpt = latest_checkpoint(art / "run")
    path = ckpt / "optimizer.pt"
    path.write_bytes(path.read_bytes()[:500])
    rewrite_checksums(ckpt)
    fails(capsys, "train", art / "store", "--out", art / "run", "--resume", "--set", "train.steps=6", names=path)


def test_resuming_with_another_model_shape(art, capsys):
    line = fails(capsys, "train", art / "store", "--out", art / "run", "--resume", "--set", "model.dim=64")
    assert "another shape" in line and "checkpoints" in line


def test_a_checkpoint_from_another_run_is_refused(art, capsys):
    record = json.loads((art / "run" / "config.json").read_text())
    record["config"]["model"]["num_layers"] = 3
    (art / "run" / "config.json").write_text(json.dumps(record))
    line = fails(capsys, "evaluate", art / "run", names="config.json")
    assert "num_layers" in line
    fails(capsys, "generate", art / "run", names="config.json")


# ---------------------------------------------------------------- values that make no sense

@pytest.mark.parametrize("argv, flag", [
    (("evaluate", "{run}", "--stride", "0"), "--stride"),
    (("evaluate", "{run}", "--batch-size", "0"), "--batch-size"),
    (("generate", "{run}", "--max-new-tokens", "0"), "--max-new-tokens"),
    (("generate", "{run}", "--max-new-tokens", "-3"), "--max-new-tokens"),
    (("generate", "{run}", "--top-p", "0"), "--top-p"),
    (("generate", "{run}", "--top-p", "1.5"), "--top-p"),
])
def test_values_that_make_no_sense(built, capsys, argv, flag):
    fails(capsys, *[a.format(run=built / "run") for a in argv], names=flag, code=2)


# ---------------------------------------------------------------- what a kill leaves, removed by the next run

def test_dead_processes_temporaries_are_removed_by_the_next_writer(art, capsys):
    pid = dead_pid()
    stale = [art / "run" / "checkpoints" / f".step-0000099.tmp-{pid}", art / f".store.tmp-{pid}",
             art / "store" / f".neighbours.npy.tmp-{pid}"]
    for p in stale[:2]:
        p.mkdir()
        (p / "junk").write_bytes(b"x" * 1000)
    stale[2].write_bytes(b"half")
    alive = art / "run" / "checkpoints" / f".step-0000098.tmp-{os.getpid()}"  # a live process's: kept
    alive.mkdir()
    assert cli(capsys, "train", art / "store", "--out", art / "run", "--resume", "--set", "train.steps=5")[0] == 0
    assert not stale[0].exists() and alive.exists()
    assert cli(capsys, "index", art / "store", "--embedder", "bytes-hash", "--k", "4", "--exclude-window", "64")[0] == 0
    assert not stale[1].exists() and not stale[2].exists()


def test_a_swap_cut_short_is_undone(art, capsys):
    """Killed between moving the old datastore aside and renaming the new one in: the next writer restores it."""
    before = snapshot(art / "store")
    os.replace(art / "store", art / f".store.old-{dead_pid()}")
    assert cli(capsys, "index", art / "store", "--embedder", "bytes-hash", "--k", "4", "--exclude-window", "64")[0] == 0
    after = snapshot(art / "store")
    assert after["tokens.bin"] == before["tokens.bin"] and after["neighbours.npy"] == before["neighbours.npy"]


# ---------------------------------------------------------------- verify

def test_verify_passes_good_artefacts_and_names_the_bad_file(art, capsys):
    for target in ("store", "run", "rrun"):
        code, out, _ = cli(capsys, "verify", art / target)
        assert code == 0 and "0 failed" in out, out
    ckpt = latest_checkpoint(art / "run")
    (ckpt / "model.safetensors").write_bytes(b"\0" * 100)
    code, out, _ = cli(capsys, "verify", art / "run")
    assert code == 1 and "FAIL" in out and "model.safetensors" in out
