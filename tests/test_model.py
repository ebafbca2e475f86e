"""The decoder: causality, KV cache, overfitting, config schema."""

from __future__ import annotations

import pytest
import torch

from knnformer.config import ModelConfig, load_config, parse_override
from knnformer.model.layers import KVCache
from knnformer.model.transformer import Transformer
from knnformer.serve.generate import filter_logits, sample_ids


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=256, context=32, num_layers=2, num_heads=2, dim=32, **overrides))


def test_causality_changing_token_t_changes_nothing_before_t():
    model = tiny_model().eval()
    x = torch.randint(0, 256, (2, 32))
    base, _ = model(x)
    for t in (0, 7, 31):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 256
        out, _ = model(y)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])  # and the change is seen from t on


def assert_cached_decoding_matches_full_forward(model: Transformer) -> None:
    """A 10-token prompt then 14 tokens one at a time through the KV cache give the full forward's logits."""
    x = torch.randint(0, 256, (1, 24))
    full, _ = model(x)
    cache = KVCache.empty(model.config, 1, "cpu", torch.float32)
    first, _ = model(x[:, :10], cache=cache)
    steps = [first] + [model(x[:, t : t + 1], cache=cache)[0] for t in range(10, 24)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_kv_cache_equals_full_forward():
    assert_cached_decoding_matches_full_forward(tiny_model().eval())


def test_tiny_model_overfits_tiny_text():
    torch.manual_seed(0)
    model = tiny_model()
    data = torch.tensor(list(b"to be or not to be, that is the question. " * 3))[:33]
    x, y = data[:-1][None], data[1:][None]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="longer than the model's context"):
        tiny_model()(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than the model's context"):
        list(sample_ids(tiny_model(), [1] * 40, 5))


def test_generation_is_seeded_and_runs_past_the_context():
    model = tiny_model().eval()
    a = list(sample_ids(model, [65, 66], 80, temperature=1.0, seed=3))
    b = list(sample_ids(model, [65, 66], 80, temperature=1.0, seed=3))
    assert a == b and len(a) == 80


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.count_nonzero(filter_logits(logits, 1.0, 2, None)) == 2
    probs = filter_logits(logits, 1.0, None, 0.7)  # 0.5 + 0.3 reach 0.7: two tokens kept
    assert torch.count_nonzero(probs) == 2 and torch.isclose(probs.sum(), torch.tensor(1.0))


def test_config_rejects_unknown_keys_and_wrong_types():
    assert load_config("tiny", ["train.steps=7", "train.lr=1e-3"]).train.steps == 7
    assert load_config("tiny", ["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(ValueError, match="unknown config key 'train.stepz'"):
        load_config("tiny", ["train.stepz=7"])
    with pytest.raises(ValueError, match="train.steps must be of type int"):
        load_config("tiny", ["train.steps=many"])
    # a text field given a number (YAML reads `layers=3` as an int) takes its text; a bool is still refused
    assert load_config("tiny", ["retrieval.layers=1"]).retrieval.layers == "1"
    with pytest.raises(ValueError, match="retrieval.layers must be of type str"):
        load_config("tiny", ["retrieval.layers=true"])
    with pytest.raises(ValueError, match="train.dtype must be one of"):
        load_config("tiny", ["train.dtype=fp8"])
    with pytest.raises(ValueError, match="no config preset"):
        load_config("nope")
    with pytest.raises(ValueError, match="divisible"):
        load_config(None, ["model.dim=30", "model.num_heads=4"])
    with pytest.raises(ValueError, match="dotted path"):
        parse_override("steps=3")
