"""The machine a run lands on, without starting processes: the device, the precision ``auto`` picks from
faked CPU flags, threads from the free cores, and the one-line errors of ``--device`` and ``--nproc``."""

from __future__ import annotations

import pytest
import torch

from knnformer.runtime import autocast, choose_dtype, free_cores, resolve_device
from knnformer.train import parallel


def test_auto_precision_follows_the_cpu_flags():
    cpu = torch.device("cpu")
    assert choose_dtype("auto", cpu, {"avx2", "avx512f", "avx512_bf16"})[0] == "bfloat16"
    assert choose_dtype("auto", cpu, {"avx2", "amx_bf16", "amx_tile"})[0] == "bfloat16"
    dtype, why = choose_dtype("auto", cpu, {"avx2", "fma"})  # AVX2 only (Zen 3): bf16 was 15x slower there
    assert dtype == "float32" and "no native bf16" in why
    assert choose_dtype("float32", cpu, {"avx512_bf16"}) == ("float32", "float32 as configured")
    assert choose_dtype("bfloat16", cpu, set())[0] == "bfloat16"


def test_autocast_follows_the_resolved_precision():
    cpu = torch.device("cpu")
    with autocast("bfloat16", cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("float32", cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast("auto", cpu):
        expected = getattr(torch, choose_dtype("auto", cpu)[0])
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == expected


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_free_cores_is_at_least_one_and_shared_among_ranks():
    import os

    assert 1 <= free_cores() <= (os.cpu_count() or 1)
    assert free_cores(ranks_here=64) == 1


def test_nproc_above_the_cores_is_refused():
    with pytest.raises(ValueError, match="more than the"):
        parallel.launch(10_000, ["train", "x", "--out", "y"], "cpu")


def test_alone_the_world_is_one_rank(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    world, device = parallel.start("cpu")
    assert world.size == 1 and world.main and device.type == "cpu"


def test_strip_nproc():
    from knnformer.cli.train import strip_nproc

    assert strip_nproc(["train", "d", "--nproc", "2", "--out", "r"]) == ["train", "d", "--out", "r"]
    assert strip_nproc(["train", "d", "--nproc=2"]) == ["train", "d"]


def test_first_line_and_record_say_what_was_picked(tmp_path, byte_store, tiny_config, capsys):
    from knnformer.cli import main
    from knnformer.run.record import load_run

    code = main(["-q", "train", str(byte_store.path), "--out", str(tmp_path / "run"), "--config", "tiny",
              "--device", "cpu", "--set", "train.steps=2", "--set", "train.dtype=auto"])
    assert code == 0
    _, record, _ = load_run(tmp_path / "run")
    dtype, why = choose_dtype("auto", torch.device("cpu"))
    assert record["runtime"]["device"] == "cpu" and record["runtime"]["dtype"] == dtype
    assert record["runtime"]["dtype_reason"] == why
    main(["train", str(byte_store.path), "--out", str(tmp_path / "run2"), "--config", "tiny", "--device", "cpu",
          "--set", "train.steps=1", "--set", "train.dtype=auto"])
    err = capsys.readouterr().err
    assert f"on cpu, {dtype} ({why})" in err


def test_activation_checkpointing_and_fp16_train(tmp_path, byte_store, tiny_config):
    import json
    import math

    from knnformer.train.trainer import train

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    cfg = tiny_config.train
    cfg.steps, cfg.eval_interval, cfg.grad_accum = 3, 0, 2
    train(tmp_path / "plain", byte_store, tiny_config)
    cfg.activation_checkpointing = True  # recomputed in the backward pass: the same numbers
    train(tmp_path / "recompute", byte_store, tiny_config)
    assert losses(tmp_path / "recompute") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
    cfg.activation_checkpointing, cfg.dtype = False, "float16"  # fp16 autocast with a gradient scaler
    train(tmp_path / "fp16", byte_store, tiny_config)
    assert all(math.isfinite(x) for x in losses(tmp_path / "fp16"))
    assert losses(tmp_path / "fp16") == pytest.approx(losses(tmp_path / "plain"), rel=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_run_trains_on_cuda_in_the_precision_auto_picks(tmp_path, byte_store, tiny_config):
    from knnformer.run.record import load_run
    from knnformer.train.trainer import train

    tiny_config.train.steps, tiny_config.train.eval_interval, tiny_config.train.dtype = 3, 0, "auto"
    train(tmp_path / "run", byte_store, tiny_config, device="cuda")
    _, record, _ = load_run(tmp_path / "run")
    runtime = record["runtime"]
    assert runtime["device"].startswith("cuda")
    assert runtime["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
