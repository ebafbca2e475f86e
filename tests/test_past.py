"""``retrieval.sources=train,past``: a chunk also retrieves the earlier, out-of-window chunks of its own document,
never the current chunk, the window or anything later."""

from __future__ import annotations

import numpy as np
import pytest

from knnformer.config import load_config
from knnformer.data.corpus import Document
from knnformer.data.datastore import Datastore, write_datastore
from knnformer.data.tokenizer import ByteTokenizer
from knnformer.eval.evaluate import evaluate_run
from knnformer.retrieval.build import index_datastore
from knnformer.retrieval.neighbours import load_neighbours
from knnformer.run.batches import neighbour_inputs
from knnformer.train.trainer import train

C, T = 16, 64


def long_doc_store(tmp_path, embedder: str = "bytes-hash") -> Datastore:
    """Long documents that each repeat their own phrases: a chunk's best match is often earlier in its document."""
    words = ["apple", "bridge", "candle", "dragon", "ember", "falcon", "garden", "harbor", "island", "jungle"]
    docs = []
    for i, w in enumerate(words):
        text = "".join(f"The {w} number {i} saw {w}s at line {j % 7}. " for j in range(40))
        docs.append(Document(f"doc{i}", text, "valid" if i >= 8 else "train"))
    write_datastore(tmp_path / "store", docs, ByteTokenizer(), [])
    index_datastore(tmp_path / "store", embedder=embedder, index="flat", k=4, chunk_size=C, exclude_window=2 * T)
    return Datastore.open(tmp_path / "store")


@pytest.mark.parametrize("split", ["train", "valid"])
def test_past_never_returns_the_current_or_a_later_chunk(tmp_path, split):
    store = long_doc_store(tmp_path)
    nb = load_neighbours(store)
    layout = nb.layout
    lo_tok, hi_tok = store.split_range(split)
    starts = np.arange(0, hi_tok - lo_tok - T - 1, C)
    tokens, mask, ids = neighbour_inputs(nb, split, starts, T, 4, past=True)
    split_lo = layout.split_chunks[split][0]
    queries = nb.window_chunk_ids(split, lo_tok + starts, T + C, previous=True)[:, : T // C + 1]
    num_past = 0
    for b in range(len(starts)):
        w0 = split_lo + starts[b] // C
        for s in range(queries.shape[1]):
            q = queries[b, s]
            for j, c in enumerate(ids[b, s]):
                # the index's train neighbours never touch a train query's document (the leakage rule), and are
                # never valid chunks: anything else is from the query's own document
                touches = layout.doc_last[c] >= layout.doc_first[q] and layout.doc_first[c] <= layout.doc_last[q]
                if c < 0 or not (touches if split == "train" else c >= layout.num_train):
                    continue
                num_past += 1
                assert touches
                assert c < w0 and c < q, (b, s, c, w0, q)
                # every token handed over, continuation included, lies before the window and the query chunk
                end = layout.starts[c] + C + (C if mask[b, s, j, C:].any() else 0)
                assert end <= min(layout.starts[w0], layout.starts[q]) and mask[b, s, j, :C].any()
                assert np.array_equal(tokens[b, s, j, :C][mask[b, s, j, :C]],
                                      store.tokens[layout.starts[c] : layout.ends[c]])
    assert num_past > 0  # the document's own past does win places here
    # without past, nothing of the query's own document
    _, _, plain = neighbour_inputs(nb, split, starts, T, 4)
    assert not np.array_equal(plain, ids)


def test_past_merges_by_score_and_needs_vectors(tmp_path):
    store = long_doc_store(tmp_path)
    nb = load_neighbours(store)
    q = np.array([[40, 41]])
    merged = nb.with_past(q, np.array([40]), k=4)
    train = nb.for_chunks(q, k=4)
    assert np.all(np.diff(merged.scores, axis=-1) <= 1e-3)  # nearest first (fp16 train scores)
    assert np.all(merged.scores >= train.scores - 1e-3)  # merging only ever improves a place
    store2 = long_doc_store(tmp_path / "bm25", "bm25")
    with pytest.raises(ValueError, match="dense embedder"):
        load_neighbours(store2).with_past(q, np.array([40]), k=2)
    with pytest.raises(ValueError, match="sources"):
        load_config("tiny", ["retrieval.enabled=true", "retrieval.sources=past"])


def test_a_run_with_past_trains_and_evaluates(tmp_path):
    store = long_doc_store(tmp_path)
    config = load_config("tiny", [f"model.context={T}", "train.steps=4", "train.eval_interval=2",
                                  "train.checkpoint_interval=4", "retrieval.enabled=true",
                                  "retrieval.sources=train,past"])
    config.model.vocab_size = 256
    train(tmp_path / "run", store, config)
    result = evaluate_run(tmp_path / "run", "valid")
    assert np.isfinite(result["bits_per_byte"]) and result["retrieval"] == "on"
