"""Performer (FAVOR+) attention: approximation of softmax, causality, generation from the running state, redraws."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from knnformer.config import ModelConfig, PerformerConfig, load_config
from knnformer.model.layers import empty_cache
from knnformer.model.performer import (
    PerformerCache,
    causal_linear_attention,
    feature_logits,
    linear_attention,
    orthogonal_features,
    query_features,
)
from knnformer.model.transformer import Transformer
from knnformer.serve.generate import sample_ids


def performer_model(seed: int = 0, chunk_size: int = 8, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=256, context=32, num_layers=2, num_heads=2, dim=32,
                                   attention="performer", performer=PerformerConfig(num_features=32,
                                                                                    chunk_size=chunk_size),
                                   **overrides))


def favor(q, k, v, num_features: int, seed: int, causal: bool) -> torch.Tensor:
    W = orthogonal_features(num_features, q.shape[-1], torch.Generator().manual_seed(seed))
    qf, k_logits = query_features(q, W), feature_logits(k, W)
    return causal_linear_attention(qf, k_logits, v, 16)[0] if causal else linear_attention(qf, k_logits, v)


@pytest.mark.parametrize("causal", [True, False])
def test_error_against_softmax_shrinks_as_features_grow(causal):
    torch.manual_seed(0)
    q, k, v = (0.5 * torch.randn(1, 2, 64, 16) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    errors = []
    for M in (8, 64, 512, 4096):
        runs = [favor(q, k, v, M, seed, causal) for seed in range(4)]
        errors.append(sum(float((y - exact).norm() / exact.norm()) for y in runs) / len(runs))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.12 and errors[-1] < errors[0] / 5, errors


def test_projection_rows_are_orthogonal_within_a_block_and_gaussian_sized():
    W = orthogonal_features(96, 32, torch.Generator().manual_seed(0))
    block = W[:32]
    gram = block @ block.T
    assert torch.allclose(gram - torch.diag(gram.diagonal()), torch.zeros(32, 32), atol=1e-4)
    assert 20 < float(W.norm(dim=1).pow(2).mean()) < 44  # chi^2(32) has mean 32


def test_chunk_size_does_not_change_the_causal_result():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 50, 8) for _ in range(3))
    W = orthogonal_features(16, 8)
    qf, k_logits = query_features(q, W), feature_logits(k, W)
    a = causal_linear_attention(qf, k_logits, v, 64)[0]
    assert torch.allclose(a, causal_linear_attention(qf, k_logits, v, 7)[0], atol=1e-5)
    assert torch.allclose(a, causal_linear_attention(qf, k_logits, v, 1)[0], atol=1e-5)


def test_causality_changing_token_t_changes_nothing_before_t():
    model = performer_model().eval()
    x = torch.randint(0, 256, (2, 32))
    base, _ = model(x)
    for t in (0, 7, 13, 31):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 256
        out, _ = model(y)
        # exact in the chunks before t; within t's chunk only the keys' running maximum may round differently
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-5)
        assert torch.equal(out[:, : t // 8 * 8], base[:, : t // 8 * 8])
        assert not torch.allclose(out[:, t], base[:, t])


def test_generation_state_equals_full_forward_and_stays_constant_size():
    model = performer_model().eval()
    x = torch.randint(0, 256, (1, 30))
    full, _ = model(x)
    cache = empty_cache(model.config, 1, "cpu", torch.float32)
    assert isinstance(cache, PerformerCache)
    first, _ = model(x[:, :11], cache=cache)
    size = cache.nbytes()
    steps = [first] + [model(x[:, t : t + 1], cache=cache)[0] for t in range(11, 30)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cache.nbytes() == size and cache.length == 30


def test_sampling_is_seeded_and_runs_past_the_context():
    model = performer_model().eval()
    a = list(sample_ids(model, [65, 66], 80, temperature=1.0, seed=3))
    assert a == list(sample_ids(model, [65, 66], 80, temperature=1.0, seed=3)) and len(a) == 80


@pytest.mark.parametrize("attention", ["softmax", "performer"])
def test_bidirectional_blocks_see_the_future_and_ignore_padding(attention):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, context=32, num_layers=2, num_heads=2, dim=32, causal=False,
                                    attention=attention, performer=PerformerConfig(num_features=32))).eval()
    block, cos, sin = model.blocks[0], model.rope_cos[:20], model.rope_sin[:20]
    x = torch.randn(1, 20, 32)
    base = block(x, cos, sin)
    y = x.clone()
    y[:, -1] += 1
    assert not torch.allclose(block(y, cos, sin)[:, 0], base[:, 0])  # the first position sees the last
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[:, 12:] = False
    padded = block(x, cos, sin, key_mask=mask)[:, :12]
    other = x.clone()
    other[:, 12:] = torch.randn(1, 8, 32)
    assert torch.allclose(block(other, cos, sin, key_mask=mask)[:, :12], padded, atol=1e-5)
    assert torch.allclose(block(x[:, :12], cos[:12], sin[:12]), padded, atol=1e-5)
    with pytest.raises(ValueError, match="cannot generate"):
        empty_cache(model.config, 1, "cpu", torch.float32)


def test_redraw_is_seeded_and_the_projection_is_saved_with_the_weights():
    model = performer_model()
    key = "blocks.0.attn.favor.projection"
    before = model.state_dict()[key].clone()
    from knnformer.model.performer import redraw_features

    assert redraw_features(model, torch.Generator().manual_seed(5)) == 2
    after = model.state_dict()[key].clone()
    assert not torch.equal(before, after)
    redraw_features(model, torch.Generator().manual_seed(5))
    assert torch.equal(model.state_dict()[key], after)


def test_trainer_redraws_on_schedule_and_resume_reproduces(tmp_path, byte_store, tiny_config):
    from knnformer.run.checkpoint import latest_checkpoint
    from knnformer.train.trainer import train

    tiny_config.model.attention = "performer"
    tiny_config.model.performer.redraw_interval = 3
    tiny_config.model.performer.num_features = 16
    cfg = tiny_config.train
    cfg.steps, cfg.checkpoint_interval, cfg.log_interval, cfg.keep_checkpoints, cfg.eval_interval = 8, 4, 1, 5, 0
    train(tmp_path / "full", byte_store, tiny_config)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("redraw")] == [4, 7]  # steps 3 and 6 (0-based) start with new features
    cfg.steps = 5
    train(tmp_path / "part", byte_store, tiny_config)
    import shutil

    shutil.rmtree(latest_checkpoint(tmp_path / "part"))  # resume from step 4, after the first redraw
    cfg.steps = 8
    train(tmp_path / "part", byte_store, tiny_config, resume=True)
    again = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]


def test_config_fields_and_errors():
    config = load_config("tiny", ["model.attention=performer", "model.performer.num_features=64"])
    assert config.model.attention == "performer" and config.model.performer.num_features == 64
    with pytest.raises(ValueError, match="model.attention must be one of"):
        load_config("tiny", ["model.attention=linear"])
    with pytest.raises(ValueError, match="num_features must be positive"):
        load_config("tiny", ["model.performer.num_features=0"])
    with pytest.raises(ValueError, match="redraw_interval must be >= 0"):
        load_config("tiny", ["model.performer.redraw_interval=-1"])
    with pytest.raises(ValueError, match="unknown config key 'model.performer.features'"):
        load_config("tiny", ["model.performer.features=3"])
