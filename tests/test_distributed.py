"""Many processes on gloo (2 ranks, tiny models, a few steps): DDP gradients against one process, DDP and FSDP
loss curves against one process, a sharded checkpoint resumed at 1 and at 2 ranks, expert parallelism against the
whole MoE layer. Each test starts torchrun; they are marked ``multiprocess`` and run in the default suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from knnformer.run.checkpoint import latest_checkpoint, list_checkpoints
from knnformer.train.trainer import train

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--set", "train.steps=4", "--set", "train.eval_interval=0", "--set", "train.checkpoint_interval=2",
         "--set", "train.keep_checkpoints=3"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "knnformer.cli", "-q", *args], env=env(), capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ddp_gradients_and_expert_parallel_match_one_process(tmp_path):
    out = tmp_path / "checks.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(ROOT / "tests" / "dist_checks.py"), str(out)], env=env(), capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["world_size"] == 2
    assert found["ddp_grad_max_diff"] < 1e-6  # DDP at 2 x 4 windows == one process at 8, accumulated twice
    for rank in found["expert_parallel"]:
        assert rank["local_experts"] == 2 and rank["dropped"] > 0  # half the experts here; capacity drops some
        assert rank["output"] < 1e-6 and rank["input_grad"] < 1e-6 and rank["router_grad"] < 1e-6
        assert rank["expert_grad"] < 1e-4


@pytest.fixture
def store_dir(byte_store):
    return str(byte_store.path)


def test_ddp_and_fsdp_follow_the_one_process_loss_curve_and_resume_at_1_and_2_ranks(tmp_path, store_dir, byte_store,
                                                                                    tiny_config):
    tiny_config.train.steps, tiny_config.train.eval_interval, tiny_config.train.checkpoint_interval = 4, 0, 2
    train(tmp_path / "one", byte_store, tiny_config)
    one = losses(tmp_path / "one")
    cli("train", store_dir, "--out", str(tmp_path / "ddp"), "--config", "tiny", "--nproc", "2", *STEPS)
    assert losses(tmp_path / "ddp") == pytest.approx(one, rel=1e-5)
    record = json.loads((tmp_path / "ddp" / "config.json").read_text())["runtime"]
    assert record["world_size"] == 2 and record["parallel"] == "ddp" and record["dtype"] == "float32"
    cli("train", store_dir, "--out", str(tmp_path / "fsdp"), "--config", "tiny", "--nproc", "2",
        "--set", "train.parallel=fsdp", "--set", "train.activation_checkpointing=true", *STEPS)
    assert losses(tmp_path / "fsdp") == pytest.approx(one, rel=1e-5)
    step2 = list_checkpoints(tmp_path / "fsdp")[0]
    assert sorted(p.name for p in (step2 / "dcp").iterdir() if p.suffix == ".distcp") == ["__0_0.distcp",
                                                                                          "__1_0.distcp"]
    # the checkpoint of step 2, saved by 2 ranks, resumed at 1 rank and at 2: the same steps 3 and 4
    for ranks in (1, 2):
        run = tmp_path / f"resume{ranks}"
        shutil.copytree(tmp_path / "fsdp", run)
        shutil.rmtree(latest_checkpoint(run))
        cli("train", store_dir, "--out", str(run), "--resume", *(["--nproc", "2"] if ranks == 2 else []))
        assert losses(run) == pytest.approx(one, rel=1e-5)
        assert latest_checkpoint(run).name == "step-0000004"
    cli("evaluate", str(tmp_path / "fsdp"))  # the full weights rank 0 wrote are what evaluate reads


def test_index_over_two_ranks_gives_the_one_process_neighbours_and_a_retrieval_run_trains_under_ddp(
        tmp_path, byte_store, tiny_config):
    import numpy as np

    from knnformer.data.datastore import Datastore

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(byte_store.path, one)
    shutil.copytree(byte_store.path, two)
    cli("index", str(one), "--embedder", "bytes-hash")
    cli("index", str(two), "--embedder", "bytes-hash", "--nproc", "2")
    for name in ("embeddings.f16", "neighbours.npy", "neighbour_scores.npy"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    manifest = json.loads((two / "manifest.json").read_text())["retrieval"]
    assert manifest["embeddings"]["ranks"] == 2
    assert not list(two.glob(".embeddings.f16.shard-*"))
    assert np.load(two / "neighbours.npy").shape[0] == manifest["chunks"]["num_chunks"]
    # a RETRO run under DDP: each rank reads the neighbours of its own windows; the one-process losses
    tiny_config.train.steps, tiny_config.train.eval_interval = 3, 0
    tiny_config.retrieval.enabled = True
    train(tmp_path / "retro1", Datastore.open(two), tiny_config)
    cli("train", str(two), "--out", str(tmp_path / "retro2"), "--config", "tiny", "--nproc", "2",
        "--set", "train.steps=3", "--set", "train.eval_interval=0", "--set", "retrieval.enabled=true")
    assert losses(tmp_path / "retro2") == pytest.approx(losses(tmp_path / "retro1"), rel=1e-5)


def test_a_rank_that_dies_stops_the_others_and_leaves_only_whole_checkpoints(tmp_path, byte_store):
    import signal
    import time

    import psutil

    run = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "knnformer.cli", "-q", "train", str(byte_store.path), "--out",
                                 str(run), "--config", "tiny", "--nproc", "2", "--set", "train.steps=100000",
                                 "--set", "train.eval_interval=0", "--set", "train.checkpoint_interval=3"],
                                env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(run) and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.5)
        assert list_checkpoints(run), "no checkpoint within 3 minutes"
        ranks = {}
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                local = child.environ().get("LOCAL_RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if local is not None and "knnformer" in child.cmdline():
                ranks[local] = child
        assert set(ranks) == {"0", "1"}
        ranks["1"].send_signal(signal.SIGKILL)  # rank 1 dies mid-run
        code = launcher.wait(timeout=120)  # torchrun stops rank 0 and fails
        assert code != 0
        assert not ranks["0"].is_running() or ranks["0"].status() == psutil.STATUS_ZOMBIE
        for ckpt in list_checkpoints(run):  # every checkpoint in place is whole (temporaries are never listed)
            assert (ckpt / "checksums.json").is_file() and (ckpt / "model.safetensors").is_file()
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.communicate()


def test_a_learned_retriever_refreshes_once_under_ddp_and_takes_the_one_process_losses(tmp_path):
    from test_refresh import learned_config, line_store

    store = line_store(tmp_path)
    sets = ["model.context=64", "retrieval.enabled=true", "retrieval.chunk_size=16", "retrieval.retriever.kind=learned",
            "train.steps=11", "train.eval_interval=0", "train.checkpoint_interval=3", "retrieval.refresh.schedule=0-:4",
            "retrieval.refresh.lag=2", "retrieval.retriever.init=scratch"]
    train(tmp_path / "one", store, learned_config(*sets))
    cli("train", str(store.path), "--out", str(tmp_path / "two"), "--config", "tiny", "--nproc", "2",
        *[arg for s in sets for arg in ("--set", s)])
    rows = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")}
    # step 0's refresh in line, the others in the background on rank 0, read from disk by rank 1
    assert [(r["step"], r["refresh"]) for r in rows["two"] if "refresh" in r] == [(1, 1), (7, 2), (11, 3)]
    assert [r["loss"] for r in rows["two"]] == pytest.approx([r["loss"] for r in rows["one"]], rel=1e-5)


def test_an_expert_parallel_run_takes_the_one_process_losses_and_resumes_at_1_and_2_ranks(tmp_path, store_dir,
                                                                                         byte_store, tiny_config):
    """model.moe.expert_parallel at 2 ranks (each rank 2 of the 4 experts, DDP for the rest): the one-process
    losses; its checkpoints hold all 4 experts, and resume at 1 and at 2 ranks with the same losses. No capacity
    drops (factor 4) and no load-balancing loss, which a rank computes on its own tokens."""
    moe = {"model.ffn": "moe", "model.moe.num_experts": 4, "model.moe.router": "top1",
           "model.moe.capacity_factor": 4.0, "model.moe.aux_loss_weight": 0.0}
    tiny_config.train.steps, tiny_config.train.eval_interval, tiny_config.train.checkpoint_interval = 4, 0, 2
    tiny_config.model.ffn, tiny_config.model.moe.num_experts, tiny_config.model.moe.router = "moe", 4, "top1"
    tiny_config.model.moe.capacity_factor, tiny_config.model.moe.aux_loss_weight = 4.0, 0.0
    train(tmp_path / "one", byte_store, tiny_config)
    one = losses(tmp_path / "one")
    sets = [a for k, v in moe.items() for a in ("--set", f"{k}={v}")]
    cli("train", store_dir, "--out", str(tmp_path / "ep"), "--config", "tiny", "--nproc", "2", *STEPS, *sets,
        "--set", "model.moe.expert_parallel=true")
    assert losses(tmp_path / "ep") == pytest.approx(one, rel=1e-5)
    from safetensors.torch import load_file

    weights = load_file(latest_checkpoint(tmp_path / "ep") / "model.safetensors")
    experts = [v for k, v in weights.items() if k.endswith("experts_gate_up")]
    assert experts and all(v.shape[0] == 4 for v in experts)  # gathered from both ranks
    cli("evaluate", str(tmp_path / "ep"))  # one process reads the whole experts
    for ranks in (1, 2):
        run = tmp_path / f"resume{ranks}"
        shutil.copytree(tmp_path / "ep", run)
        shutil.rmtree(latest_checkpoint(run))
        cli("train", store_dir, "--out", str(run), "--resume", *(["--nproc", "2"] if ranks == 2 else []))
        assert losses(run) == pytest.approx(one, rel=1e-5)
        assert latest_checkpoint(run).name == "step-0000004"
