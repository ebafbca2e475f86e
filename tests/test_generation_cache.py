"""Generation with retrieval over a KV cache: every logit equals the full forward pass of the same window, for
prefill and token-by-token steps, for rows batched at different positions, and for every retriever kind."""

from __future__ import annotations

import pytest
import torch
from test_retro import C, K, random_neighbours, retro_model

T = 32  # the test model's context


def stepped_logits(model, x, nb, mask, prefill: int, vectors=None, dim: int = 0):
    """Logits (1, T, V) of x (1, T): the first ``prefill`` tokens in one cached call, then one token a call."""
    cache = model.generation_cache(1, K, 2 * C, dim)
    for s in range(nb.shape[1]):
        v = None if vectors is None else (vectors[0][0, s], vectors[1][0, s])
        cache.retrieval.put(0, s, nb[0, s], mask[0, s], v)
    out = [model(x[:, :prefill], cache=cache)[0]]
    for t in range(prefill, x.shape[1]):
        out.append(model(x[:, t : t + 1], cache=cache)[0])
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", ["plain", "unconditioned", "learned", "learned-embedder"])
def test_cached_retrieval_generation_equals_full_forward(variant):
    kwargs, vectors, dim = {}, None, 0
    if variant == "unconditioned":
        kwargs = {"condition_encoder": False}
    elif variant == "learned":
        kwargs = {"retriever": {"kind": "learned", "relevance_beta": 2.0}}
    elif variant == "learned-embedder":
        dim = 12
        kwargs = {"retriever": {"kind": "learned", "input": "embedder", "relevance_beta": 2.0},
                  "retriever_input_dim": dim}
    model = retro_model(**kwargs)
    x = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(3))
    nb, mask = random_neighbours(1, T)
    mask[0, 2, 1, 5:] = False  # a neighbour cut short
    mask[0, 0] = False  # slot 0: nothing before the window
    if dim:
        g = torch.Generator().manual_seed(4)
        vectors = (torch.randn(1, nb.shape[1], dim, generator=g), torch.randn(1, nb.shape[1], K, dim, generator=g))
    full, _ = model(x, neighbours=nb, neighbour_mask=mask, retrieval_vectors=vectors)
    for prefill in (1, C - 1, C, 13, T):
        got = stepped_logits(model, x, nb, mask, prefill, vectors, dim)
        assert torch.allclose(got, full, atol=1e-5, rtol=1e-4), (variant, prefill, (got - full).abs().max())
    # and the neighbours matter: other neighbours give other logits from position C - 1 on
    other = stepped_logits(model, x, (nb + 1) % 256, mask, C, vectors, dim)
    assert torch.allclose(other[:, : C - 1], full[:, : C - 1], atol=1e-5)
    assert not torch.allclose(other[:, C - 1 :], full[:, C - 1 :], atol=1e-3)


def test_rows_at_different_positions_step_together_like_alone():
    """Continuous batching: rows whose caches hold different lengths step one token together, each equal to its
    own full forward; a finished row's place taken by another (copy_row) keeps that row's state."""
    model = retro_model()
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (3, T), generator=g)
    nb, mask = random_neighbours(3, T, seed=6)
    full, _ = model(x, neighbours=nb, neighbour_mask=mask)
    pool = model.generation_cache(3, K, 2 * C)
    starts = [5, 16, 9]
    for b, p in enumerate(starts):  # prefill each row alone through a view of the pool
        row = pool.rows(slice(b, b + 1))
        row.length = 0
        for s in range(nb.shape[1]):
            row.retrieval.put(0, s, nb[b, s], mask[b, s])
        model(x[b : b + 1, :p], cache=row)
    pool.length = torch.tensor(starts)
    for _ in range(T - max(starts) - 1):
        pos = pool.length.clone()
        logits, _ = model(x[torch.arange(3), pos][:, None], cache=pool)
        for b in range(3):
            assert torch.allclose(logits[b, 0], full[b, pos[b]], atol=1e-5, rtol=1e-4), (b, int(pos[b]))
    assert pool.length.tolist() == [s + T - max(starts) - 1 for s in starts]
    pool.copy_row(2, 0)  # row 2 moves into row 0's place: both now continue row 2's sequence
    view = pool.rows(slice(0, 2))
    pos = int(view.length[0])
    logits, _ = model(x[[2, 1], [pos, int(view.length[1])]][:, None], cache=view)
    assert pool.length.tolist()[:2] == [pos + 1, T]
    assert torch.allclose(logits[0, 0], full[2, pos], atol=1e-5, rtol=1e-4)


def test_retrieval_with_a_cache_needs_the_generation_cache():
    from knnformer.model.layers import empty_cache

    model = retro_model()
    nb, mask = random_neighbours(1, T)
    with pytest.raises(ValueError, match="generation_cache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=empty_cache(model.config, 1, "cpu", torch.float32),
              neighbours=nb, neighbour_mask=mask)


def test_cached_sampling_of_a_run_equals_recomputing_the_window(tmp_path):
    """A trained retrieval run with its real index: greedy tokens over the KV cache are those of the full-window
    recompute while the text fits the context, and the same chunks are retrieved."""
    from test_retrieval_model import repeated_text_store

    from knnformer.config import load_config
    from knnformer.run.record import load_run
    from knnformer.serve.generate import RetrievingGenerator
    from knnformer.train.trainer import train

    store = repeated_text_store(tmp_path)
    config = load_config("tiny", ["model.context=64", "train.steps=20", "train.eval_interval=0",
                                  "retrieval.enabled=true"])
    config.model.vocab_size = 256
    train(tmp_path / "run", store, config)
    model, record, _ = load_run(tmp_path / "run")
    prompt = [int(t) for t in store.split_tokens("valid")[:21]]
    runs = []
    for cache in (True, False):
        gen = RetrievingGenerator.for_run(model, store, tmp_path / "run", record)
        runs.append((list(gen.sample(prompt, 64 - 21, temperature=0, cache=cache)), sorted(gen.retrieved)))
    assert runs[0] == runs[1] and len(runs[0][1]) == 4
    gen = RetrievingGenerator.for_run(model, store, tmp_path / "run", record)
    assert len(list(gen.sample(prompt, 150, temperature=0.8, seed=0))) == 150  # past the context: rebuilt
