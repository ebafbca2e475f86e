"""Multi-hop retrieval (``retrieval.search.hops=2``, as in multi-hop dense retrieval): a second search whose query is
the query chunk joined with its first-hop top neighbour.

The second hop's query. A frozen embedder embeds the text of the query chunk followed by the text of its first
neighbour (``second_hop_texts``); bm25 searches with that joined text; a learned retriever embeds the joined
tokens (``second_hop_tokens``: the chunk's real tokens, then the neighbour's C tokens, at most 2C).

The final K neighbours (``merge_hops``): the first hop's top neighbour, then the second hop's results without it,
nearest first. Not a merge by score: the two hops' scores come from two different query vectors, whose cosines
are not on one scale (the joined query sits closer to the corpus whenever its neighbour half matches, so a
merge by score would mostly keep the second hop anyway), and the neighbour the second query was built on is
the evidence it extends, so it stays. Each neighbour keeps the score its own hop gave it.

Leakage: the second hop searches with ``compute_neighbours`` under the query chunk's own excluded range, so its
neighbours obey the rules of the first (no chunk near the query or in its documents for train chunks; valid and
test search the train chunks only). The first neighbour it joins already obeyed them.

Files: ``neighbours-hop2.npy`` and ``neighbour_scores-hop2.npy`` beside the first hop's (in the datastore, or in a
run's refresh folder), described by the manifest entry ``neighbours_hop2``; the first hop's files stay, so
``evaluate`` can score a run with either hop.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from knnformer.data.chunks import ChunkLayout, chunk_texts
from knnformer.data.datastore import Datastore
from knnformer.retrieval.index import SearchResult
from knnformer.retrieval.search import compute_neighbours

HOP2_FILE, HOP2_SCORES_FILE = "neighbours-hop2.npy", "neighbour_scores-hop2.npy"
HOPS = (1, 2)


def second_hop_texts(store: Datastore, layout: ChunkLayout, q: np.ndarray, first: np.ndarray) -> list[str]:
    """The second hop's query text of chunks ``q``: each chunk's text followed by the text of its first-hop
    neighbour ``first`` (-1: none, the chunk's text alone)."""
    own = chunk_texts(store, layout, q)
    theirs = chunk_texts(store, layout, np.maximum(first, 0))
    return [a + b if f >= 0 else a for a, b, f in zip(own, theirs, first)]


def second_hop_tokens(store: Datastore, layout: ChunkLayout, q: np.ndarray,
                      first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The second hop's query tokens (N, 2C) and mask of chunks ``q``: each chunk's real tokens, then its first
    neighbour's (none for -1), packed to the front (padding only at the end, as ``LearnedRetriever.embed``
    asks)."""
    C = layout.chunk_size
    ar = np.arange(C)
    pos = np.concatenate([layout.starts[q][:, None] + ar, layout.starts[np.maximum(first, 0)][:, None] + ar], 1)
    mask = np.concatenate([pos[:, :C] < layout.ends[q][:, None],
                           (first[:, None] >= 0) & (pos[:, C:] < layout.ends[np.maximum(first, 0)][:, None])], 1)
    order = np.argsort(~mask, axis=1, kind="stable")  # real tokens first, each part in order
    pos, mask = np.take_along_axis(pos, order, 1), np.take_along_axis(mask, order, 1)
    ids = np.asarray(store.tokens[np.where(mask, pos, 0).reshape(-1)], dtype=np.int64).reshape(pos.shape)
    return np.where(mask, ids, 0), mask


def merge_hops(first_ids: np.ndarray, first_scores: np.ndarray, second_ids: np.ndarray,
               second_scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) ids and scores: the first hop's top neighbour, then the second hop's (N, >= k - 1) results other
    than it, nearest first; -1 (score 0) where fewer are left. See the module docstring for why."""
    top = first_ids[:, :1].astype(np.int64)
    second = second_ids.astype(np.int64)
    cand = np.concatenate([top, second], 1)
    score = np.concatenate([first_scores[:, :1], second_scores], 1).astype(np.float32)
    valid = np.concatenate([top >= 0, (second >= 0) & (second != top)], 1)
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    keep = np.take_along_axis(valid, order, 1)
    ids = np.where(keep, np.take_along_axis(cand, order, 1), -1).astype(np.int32)
    return ids, np.where(keep, np.take_along_axis(score, order, 1), 0).astype(np.float16)


def second_hop(layout: ChunkLayout, first_ids: np.ndarray, first_scores: np.ndarray,
               search: Callable[[np.ndarray, int], SearchResult], k: int, exclude_window: int,
               exclude_same_document: bool,
               exact: Callable[[np.ndarray, np.ndarray, np.ndarray, int], SearchResult] | None = None,
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Every chunk's final ``k`` neighbours after the second hop; ``search(ids, kk)`` (and ``exact``, as in
    ``compute_neighbours``) search with the second-hop query of chunks ``ids``. Returns ids, scores and the
    number of rows short of k."""
    ids, scores, _ = compute_neighbours(layout, search, k, exclude_window, exclude_same_document, exact=exact)
    ids, scores = merge_hops(np.asarray(first_ids), np.asarray(first_scores), ids, scores, k)
    return ids, scores, int((ids < 0).any(1).sum())
