"""Trainer, checkpoints, resume and evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from knnformer.eval.scoring import score_tokens, window_plan
from knnformer.run.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from knnformer.run.record import load_run
from knnformer.train.optim import lr_at
from knnformer.train.trainer import train


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule(tiny_config):
    cfg = tiny_config.train
    cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr = 100, 10, 1.0, 0.1
    assert lr_at(0, cfg) == pytest.approx(1 / 11)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_checkpoint_round_trip(tmp_path, byte_store, tiny_config):
    tiny_config.train.steps = 3
    train(tmp_path / "run", byte_store, tiny_config)
    model, record, path = load_run(tmp_path / "run")
    ckpt = load_checkpoint(path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["weights"][name])
    assert record["config"]["model"]["dim"] == tiny_config.model.dim
    x = torch.randint(0, 256, (1, 16))
    again, _, _ = load_run(tmp_path / "run")
    assert torch.equal(model(x)[0], again(x)[0])


def test_resume_reproduces_losses_exactly(tmp_path, byte_store, tiny_config):
    cfg = tiny_config.train
    cfg.steps, cfg.checkpoint_interval, cfg.log_interval, cfg.keep_checkpoints = 12, 5, 1, 5
    tiny_config.model.dropout = 0.1  # dropout makes the RNG state part of what resume must restore
    train(tmp_path / "full", byte_store, tiny_config)
    full = losses(tmp_path / "full")
    cfg.steps = 7  # stop early: checkpoints at 5 and 7
    train(tmp_path / "part", byte_store, tiny_config)
    # a crash after step 7 would leave step-7 metrics; resume from step 5 must drop and redo them
    import shutil

    shutil.rmtree(latest_checkpoint(tmp_path / "part"))
    cfg.steps = 12
    result = train(tmp_path / "part", byte_store, tiny_config, resume=True)
    assert result.step == 12
    assert losses(tmp_path / "part") == full


def test_new_run_refuses_to_overwrite(tmp_path, byte_store, tiny_config):
    tiny_config.train.steps = 2
    train(tmp_path / "run", byte_store, tiny_config)
    with pytest.raises(ValueError, match="--resume"):
        train(tmp_path / "run", byte_store, tiny_config)


def test_checkpoints_are_pruned(tmp_path, byte_store, tiny_config):
    cfg = tiny_config.train
    cfg.steps, cfg.checkpoint_interval, cfg.keep_checkpoints = 6, 1, 2
    train(tmp_path / "run", byte_store, tiny_config)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000005", "step-0000006"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_checkpoint_is_refused(tmp_path, byte_store, tiny_config, damage):
    tiny_config.train.steps = 2
    train(tmp_path / "run", byte_store, tiny_config)
    weights = latest_checkpoint(tmp_path / "run") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_run(tmp_path / "run")


def test_window_plan_scores_every_token_once():
    for n, context, stride in [(100, 16, 16), (100, 16, 5), (17, 16, 16), (2, 16, 4), (1000, 64, 63)]:
        seen = np.zeros(n, dtype=int)
        for begin, first, count in window_plan(n, context, stride):
            assert count <= context
            seen[begin + 1 + first : begin + 1 + count] += 1
            if begin > 0 and count == context:  # a later window scores only its last `stride` tokens
                assert first == context - stride
        assert seen[0] == 0 and (seen[1:] == 1).all()


def test_bits_per_byte_equals_hand_computation(tiny_config):
    torch.manual_seed(0)
    from knnformer.model.transformer import Transformer

    model = Transformer(tiny_config.model).eval()
    tokens = np.array([72, 195, 169, 108, 108, 111, 33, 10, 72, 105], dtype=np.uint16)  # "Héllo!\nHi"
    token_bytes = np.ones(256, dtype=np.int64)
    total = score_tokens(model, tokens, token_bytes)
    # by hand: one window, log-softmax of every next token
    with torch.no_grad():
        logits, _ = model(torch.tensor(tokens[:-1].astype(np.int64))[None])
    logp = torch.log_softmax(logits[0].double(), -1)
    nll = -sum(float(logp[i, tokens[i + 1]]) for i in range(len(tokens) - 1))
    assert total["tokens"] == 9 and total["bytes"] == 9
    assert total["nll"] == pytest.approx(nll, rel=1e-6)
    bpb = nll / math.log(2) / 9
    from knnformer.eval.evaluate import summarize

    assert summarize(total, "valid", 32, 32)["bits_per_byte"] == pytest.approx(bpb, rel=1e-6)
    # a sliding window with a smaller stride scores the same tokens (here all fit in one context)
    assert score_tokens(model, tokens, token_bytes, stride=3)["nll"] == pytest.approx(nll, rel=1e-5)
    # BPE-style byte lengths: bytes are the UTF-8 lengths of the scored tokens, not their count
    multi = token_bytes.copy()
    multi[tokens[1:]] = 2
    assert score_tokens(model, tokens, multi)["bytes"] == 18


def test_flat_retrieval_keys_still_load_with_a_deprecation_note(caplog):
    """The retrieval section was split into retriever / refresh / search; the old flat keys of presets, run
    records and --set still load into their new homes, and --set names the new key."""
    from knnformer.config import Derived, config_from_dict, load_config

    with caplog.at_level("WARNING"):
        config = load_config("tiny", ["retrieval.enabled=true", "retrieval.retriever=learned",
                                      "retrieval.refresh=0-:10", "retrieval.refresh_lag=3", "retrieval.hops=2"])
    assert (config.retrieval.retriever.kind, config.retrieval.refresh.schedule) == ("learned", "0-:10")
    assert (config.retrieval.refresh.lag, config.retrieval.search.hops) == (3, 2)
    assert "retrieval.refresh_lag is deprecated: use retrieval.refresh.lag" in caplog.text
    old_record = {"config": {"model": {"vocab_size": 256}, "retrieval": {
        "enabled": True, "chunk_size": 16, "embedder": "minilm", "retriever": "learned",
        "retriever_input": "embedder", "retriever_input_dim": 384, "sources": "train,past"}}}
    derived = Derived.of_record(old_record)
    assert derived == Derived(chunk_size=16, embedder="minilm", retriever_input_dim=384)
    rcfg = config_from_dict(old_record["config"]).retrieval
    assert (rcfg.retriever.kind, rcfg.retriever.input, rcfg.search.sources) == ("learned", "embedder", "train,past")
    with pytest.raises(ValueError, match="unknown config key 'retrieval.retriever.kinds'"):
        load_config("tiny", ["retrieval.retriever.kinds=learned"])


def test_runs_recorded_when_encoder_dim_0_meant_half_keep_their_encoder():
    """Issue 13 moved retrieval.encoder_dim 0 from half to a quarter of model.dim. A RETRO run recorded before
    (its derived section has no encoder_dim) rebuilds the half-width encoder its weights were trained in; a run
    recorded now builds the quarter-width one; an explicit width is never overridden."""
    import dataclasses

    from knnformer.config import Derived, ModelConfig, config_from_dict, retrieval_config
    from knnformer.model.transformer import Transformer

    mcfg = ModelConfig(vocab_size=256, context=32, num_layers=3, num_heads=2, dim=64)
    old_weights = Transformer(mcfg, retrieval_config(enabled=True, chunk_size=8, encoder_dim=32)).state_dict()
    rcfg = retrieval_config(enabled=True, chunk_size=8)  # encoder_dim 0, as the old run recorded it
    record = {"config": {"model": dataclasses.asdict(mcfg), "retrieval": dataclasses.asdict(rcfg)},
              "derived": {"chunk_size": 8, "embedder": "bm25", "retriever_input_dim": 0}}
    derived = Derived.of_record(record)
    assert derived.encoder_dim == 32
    old = Transformer(mcfg, derived.apply(config_from_dict(record["config"]).retrieval))
    old.load_state_dict(old_weights)  # the shapes fit
    # a run recorded now: derived holds encoder_dim 0, so the config's rule (a quarter) builds it
    record["derived"] = dataclasses.asdict(Derived(chunk_size=8, embedder="bm25"))
    new_rcfg = Derived.of_record(record).apply(rcfg)
    assert new_rcfg.resolved_encoder(mcfg) == (16, 1)
    with pytest.raises(RuntimeError, match="size mismatch"):
        Transformer(mcfg, new_rcfg).load_state_dict(old_weights)
    # records from before the derived section, and an explicit width in an old record
    flat = {"config": {"model": {"dim": 64}, "retrieval": {"enabled": True, "chunk_size": 8}}}
    assert Derived.of_record(flat).encoder_dim == 32
    explicit = {"config": {"model": {"dim": 64}, "retrieval": {"enabled": True, "encoder_dim": 48}}, "derived": {}}
    assert Derived.of_record(explicit).apply(retrieval_config(enabled=True, encoder_dim=48)).encoder_dim == 48


def test_resuming_a_run_recorded_when_encoder_dim_0_meant_half_keeps_its_encoder(tmp_path):
    """`train --resume` of such a run trains on in the half-width encoder its checkpoints hold (an explicit
    --set retrieval.encoder_dim still wins); a run recorded now keeps the config's rule."""
    import argparse
    import dataclasses

    from conftest import make_datastore

    from knnformer.cli.train import resolve_train_config
    from knnformer.config import ModelConfig, retrieval_config

    store = make_datastore(tmp_path)
    mcfg = ModelConfig(vocab_size=256, context=32, num_layers=2, num_heads=2, dim=64)
    record = {"config": {"model": dataclasses.asdict(mcfg),
                         "retrieval": dataclasses.asdict(retrieval_config(enabled=True, chunk_size=8))},
              "derived": {"chunk_size": 8, "embedder": "bm25", "retriever_input_dim": 0},
              "datastore": {"tokenizer_fingerprint": store.manifest["tokenizer"]["fingerprint"]}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(record))

    def resumed(*sets):
        args = argparse.Namespace(resume=True, set=list(sets), config=None)
        return resolve_train_config(args, store, tmp_path / "run").retrieval

    assert resumed().encoder_dim == 32
    assert resumed("retrieval.encoder_dim=16").encoder_dim == 16
    record["derived"]["encoder_dim"] = 0  # recorded now
    (tmp_path / "run" / "config.json").write_text(json.dumps(record))
    assert resumed().resolved_encoder(mcfg) == (16, 1)
