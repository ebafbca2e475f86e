"""Multi-hop retrieval: the second hop's query is the chunk joined with its first neighbour, its neighbours obey
the leakage rules, and evaluate reports what the second hop was worth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_refresh import C, learned_config, line_store

from knnformer.data.chunks import chunk_texts
from knnformer.eval.evaluate import evaluate_run
from knnformer.retrieval.build import index_datastore
from knnformer.retrieval.embedders import make_embedder
from knnformer.retrieval.hops import merge_hops, second_hop_texts, second_hop_tokens
from knnformer.retrieval.index import exact_search
from knnformer.retrieval.neighbours import load_neighbours
from knnformer.run.refreshes import load_refresh
from knnformer.train.trainer import train

WINDOW = 128


def assert_no_leakage(nb):
    layout = nb.layout
    n = layout.num_train
    ids = np.asarray(nb.ids)
    assert ids.max() < n  # every neighbour is a train chunk, valid's included
    train_ids = ids[:n]
    q = np.repeat(np.arange(n), ids.shape[1]).reshape(train_ids.shape)
    real = train_ids >= 0
    assert not np.any(real & (layout.doc_first[np.maximum(train_ids, 0)] == layout.doc_first[q]))
    span_end = layout.span_end(np.maximum(train_ids, 0))
    near = (span_end > layout.starts[q] - WINDOW) & (layout.starts[np.maximum(train_ids, 0)] < layout.ends[q] + WINDOW)
    assert not np.any(real & near)


@pytest.fixture
def hop_store(tmp_path):
    store = line_store(tmp_path)  # indexed with one hop
    index_datastore(store.path, embedder="bytes-hash", index="flat", k=4, chunk_size=C, exclude_window=WINDOW, hops=2)
    return store


def test_the_second_hop_searches_with_the_chunk_joined_with_its_first_neighbour(hop_store):
    one, two = load_neighbours(hop_store), load_neighbours(hop_store, hops=2)
    layout = one.layout
    manifest = json.loads((hop_store.path / "manifest.json").read_text())["retrieval"]
    assert manifest["neighbours"]["hops"] == 1 and manifest["neighbours_hop2"]["hops"] == 2
    q = np.arange(layout.num_chunks)
    first = np.asarray(one.ids)[:, 0]
    texts = second_hop_texts(hop_store, layout, q[:50], first[:50])
    own, theirs = chunk_texts(hop_store, layout, q[:50]), chunk_texts(hop_store, layout, first[:50])
    assert texts == [a + b for a, b in zip(own, theirs)]
    # the final list: the first hop's top neighbour, then the second hop's results without it
    assert np.array_equal(np.asarray(two.ids)[:, 0], first)
    assert not np.any(np.asarray(two.ids)[:, 1:] == first[:, None])
    # valid chunks (no exclusion): the rest is the exact top of the joined text's vector over train
    emb = make_embedder("bytes-hash")
    lo, hi = layout.split_chunks["valid"]
    xb = emb.embed(chunk_texts(hop_store, layout, np.arange(layout.num_train)))
    xq = emb.embed(second_hop_texts(hop_store, layout, q[lo:hi], first[lo:hi]))
    top = exact_search(xb, xq, 5)
    expected = np.array([[s for i, s in zip(I, D) if i != f][:3] for I, D, f in zip(top.I, top.D, first[lo:hi])])
    np.testing.assert_allclose(np.asarray(two.scores[lo:hi, 1:], np.float32), expected, atol=2e-3)
    assert (np.asarray(two.ids) != np.asarray(one.ids)).any()  # the second hop changed something


def test_second_hop_neighbours_obey_the_leakage_rules(hop_store):
    assert_no_leakage(load_neighbours(hop_store, hops=2))


def test_merge_hops_by_hand():
    first = np.array([[5, 6, 7], [-1, -1, -1]])
    first_s = np.array([[0.9, 0.8, 0.7], [0, 0, 0]], np.float16)
    second = np.array([[3, 5, 4], [2, 1, -1]])
    second_s = np.array([[0.95, 0.9, 0.6], [0.5, 0.4, 0]], np.float16)
    ids, scores = merge_hops(first, first_s, second, second_s, 3)
    assert ids.tolist() == [[5, 3, 4], [2, 1, -1]]
    np.testing.assert_allclose(scores.astype(np.float32), [[0.9, 0.95, 0.6], [0.5, 0.4, 0]], atol=1e-3)


def test_second_hop_tokens_are_packed(hop_store):
    from types import SimpleNamespace

    full = load_neighbours(hop_store).layout
    short = 10
    ends = full.ends.copy()
    ends[short] -= 5  # as a document's last, short chunk: its padding must not sit between the two texts
    layout = SimpleNamespace(starts=full.starts, ends=ends, chunk_size=C)
    ids, mask = second_hop_tokens(hop_store, layout, np.array([short]), np.array([3]))
    n = layout.ends[short] - layout.starts[short]
    expected = np.concatenate([hop_store.tokens[layout.starts[short] : layout.ends[short]],
                               hop_store.tokens[layout.starts[3] : layout.starts[3] + C]])
    assert mask[0].sum() == n + C and mask[0, : n + C].all()
    assert np.array_equal(ids[0, : n + C], expected)


def test_a_two_hop_run_and_the_gain_of_the_second_hop(hop_store, tmp_path):
    config = learned_config("train.steps=2", "train.checkpoint_interval=2", "train.eval_interval=0")
    config.retrieval.retriever.kind = "frozen"
    config.retrieval.search.hops = 2
    train(tmp_path / "two", hop_store, config)
    result = evaluate_run(tmp_path / "two", "valid", gain_windows=0)
    hop = result["second_hop"]
    assert hop["trained_with_hops"] == 2 and "note" not in hop
    assert hop["bits_per_byte_hop2"] == result["bits_per_byte"]
    assert hop["gain"] == pytest.approx(hop["bits_per_byte_hop1"] - hop["bits_per_byte_hop2"])
    config.retrieval.search.hops = 1
    train(tmp_path / "one", hop_store, config)
    hop = evaluate_run(tmp_path / "one", "valid", gain_windows=0)["second_hop"]
    assert hop["trained_with_hops"] == 1 and "evaluation only" in hop["note"]


def test_a_learned_refresh_computes_both_hops(hop_store, tmp_path):
    config = learned_config("train.steps=1", "train.checkpoint_interval=1", "train.eval_interval=0",
                            "retrieval.retriever_init=scratch", "retrieval.hops=2")
    train(tmp_path / "run", hop_store, config)
    folder = tmp_path / "run" / "refresh" / "refresh-0001"
    layout = load_neighbours(hop_store).layout
    one, two = load_refresh(folder, hop_store, layout), load_refresh(folder, hop_store, layout, hops=2)
    assert json.loads((folder / "manifest.json").read_text())["hops"] == 2
    assert np.array_equal(np.asarray(two.ids)[:, 0], np.asarray(one.ids)[:, 0])
    assert_no_leakage(two)
    result = evaluate_run(tmp_path / "run", "valid", gain_windows=0)
    assert result["second_hop"]["trained_with_hops"] == 2


def test_generation_retrieves_both_hops_like_the_precomputed_ones(hop_store):
    """Live retrieval for a two-hop run: a valid chunk's text gets the two-hop neighbours stored for it (valid
    chunks search all of train, so live and precomputed searches agree; up to the order of exact duplicates,
    which this corpus of repeated lines is full of: their texts and scores agree)."""
    from knnformer.retrieval.live import open_retriever

    two = load_neighbours(hop_store, hops=2)
    lo, hi = two.layout.split_chunks["valid"]
    q = np.arange(lo, min(hi, lo + 20))
    texts = chunk_texts(hop_store, two.layout, q)
    retriever = open_retriever(hop_store)
    one_hop = retriever.neighbours(texts, two.k).scores
    retriever.hops = 2
    live = retriever.neighbours(texts, two.k)
    stored = two.for_chunks(q[:, None], two.k)
    assert np.array_equal(live.tokens[..., :C], stored.tokens[:, 0, :, :C])
    assert np.allclose(live.scores, np.asarray(two.scores)[q].astype(np.float32), atol=2e-3)
    assert not np.allclose(one_hop, live.scores, atol=2e-3)  # the second hop's query scored them
    assert live.tokens.shape == (len(q), two.k, 2 * C)
