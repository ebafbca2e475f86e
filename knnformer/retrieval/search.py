"""Searching for neighbours under the leakage rules: ``excluded_ranges`` (what each query chunk may not
retrieve), ``compute_neighbours`` (every chunk's K nearest allowed train chunks, from any search function, exact
or approximate) and ``dense_neighbours`` (index the train vectors and search them all).

Leakage rules (DESIGN.md invariant 2), applied to train queries after over-fetching from the index:

- no neighbour whose tokens, continuation included, lie within ``exclude_window`` tokens of the query chunk
  (a training window of up to that many tokens that holds the query never also holds its neighbour); this
  rule always applies, so it also covers a window that spans several short documents;
- when train has more than one document: no neighbour that touches any document the query chunk touches
  (with a single train document, as in a corpus split by position, only the window rule applies).

Valid and test queries search the train chunks only (the index holds nothing else) with no further filter.
Both rules exclude one contiguous range of train chunk ids per query (see ``excluded_ranges``), so a query
over-fetches K plus that range's size; rows an approximate index still leaves short fall back to an exact search
that skips the range (dense) or are searched again with more candidates (bm25). A row is short of K (padded with
-1, counted in the manifest) only when fewer than K train chunks are allowed at all.

The index stage (``build.py``), a run's refreshes (``train/refresh.py``) and the second hop (``hops.py``) all
search through here, so each gets the same rules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from knnformer.data.chunks import ChunkLayout
from knnformer.retrieval.index import (
    BM25Index,
    DenseIndex,
    SearchResult,
    build_dense_index,
    exact_search_excluding,
    measure_recall,
)
from knnformer.retrieval.neighbours import Progress, _no_progress

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- search and filter

def excluded_ranges(layout: ChunkLayout, q: np.ndarray, exclude_window: int,
                    exclude_same_document: bool) -> tuple[np.ndarray, np.ndarray]:
    """The train chunk ids each query chunk ``q`` (B,) may not retrieve, as half-open ranges ``[lo, hi)``.

    Chunk starts, neighbour span ends (continuation included) and their documents all grow with the chunk id,
    so the chunks near a query (window rule) and the chunks touching its documents (document rule) are two
    ranges of ids, both holding the query itself: their union is one range. Valid and test queries get an
    empty range."""
    n = layout.num_train
    train = np.arange(n)
    starts, span_end = layout.starts[:n], layout.span_end(train)
    qs, qe = layout.starts[q], layout.ends[q]
    lo = np.searchsorted(span_end, qs - exclude_window, side="right")
    hi = np.searchsorted(starts, qe + exclude_window, side="left")
    if exclude_same_document:
        span_doc_last = np.searchsorted(layout.doc_starts, span_end - 1, side="right") - 1
        lo = np.minimum(lo, np.searchsorted(span_doc_last, layout.doc_first[q], side="left"))
        hi = np.maximum(hi, np.searchsorted(layout.doc_first[:n], layout.doc_last[q], side="right"))
    is_train = q < n
    return np.where(is_train, lo, 0), np.where(is_train, hi, 0)


MAX_RESULTS_PER_CALL = 1 << 22
"""Bound on rows x candidates of one search call, so a large over-fetch never holds more than ~50 MB."""


def compute_neighbours(layout: ChunkLayout, search: Callable[[np.ndarray, int], SearchResult], k: int,
                       exclude_window: int, exclude_same_document: bool, batch_size: int = 2048,
                       progress: Callable[[int], None] | None = None,
                       exact: Callable[[np.ndarray, np.ndarray, np.ndarray, int], SearchResult] | None = None,
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """The ``k`` nearest allowed train chunks of every chunk; ``search(ids, kk)`` searches for the query chunks
    ``ids``. Returns (ids (N, k) int32, scores (N, k) float16, number of rows left with fewer than k).

    Each query over-fetches ``k`` plus the size of its excluded range (rounded up to a power of two), which an
    exact index always fills with at least ``k`` allowed chunks. Rows an approximate index leaves short (an
    IVF search sees only the lists it probes, and a long document's range outgrows the small first fetch) go to
    ``exact(ids, lo, hi, k)``, a search that skips the excluded range itself; without it they are searched again
    with the whole range's over-fetch, then four times as many candidates, up to every train chunk."""
    n, n_train = layout.num_chunks, layout.num_train
    out_i = np.full((n, k), -1, dtype=np.int32)
    out_d = np.zeros((n, k), dtype=np.float16)
    first = min(n_train, 1 << int(np.ceil(np.log2(4 * k + 16))))
    for b in range(0, n, batch_size):
        q = np.arange(b, min(b + batch_size, n))
        lo, hi = excluded_ranges(layout, q, exclude_window, exclude_same_document)
        # enough candidates to hold k allowed ones whatever the excluded range holds, as a power of two
        need = np.minimum(n_train, 2 ** np.ceil(np.log2(k + hi - lo + 8)).astype(np.int64))
        kk0 = np.minimum(need, first)  # most rows are served by a small over-fetch; only the short ones pay more
        todo = [(kk, q[kk0 == kk], lo[kk0 == kk], hi[kk0 == kk], need[kk0 == kk]) for kk in np.unique(kk0)]
        while todo:
            kk, rows, rlo, rhi, rneed = todo.pop()
            step = max(1, MAX_RESULTS_PER_CALL // kk)
            for s in range(0, len(rows), step):
                sl = slice(s, s + step)
                ids, ilo, ihi, ineed = rows[sl], rlo[sl], rhi[sl], rneed[sl]
                D, I = search(ids, int(kk))
                ok = (I >= 0) & ~((I >= ilo[:, None]) & (I < ihi[:, None]))
                order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # allowed ones first, nearest first
                keep = np.take_along_axis(ok, order, 1)
                out_i[ids, : keep.shape[1]] = np.where(keep, np.take_along_axis(I, order, 1), -1)
                out_d[ids, : keep.shape[1]] = np.where(keep, np.take_along_axis(D, order, 1), 0)
                short = ok.sum(1) < np.minimum(k, n_train - (ihi - ilo))
                # next: over-fetch by the whole excluded range; with an exact search around the range at hand, go
                # to it at once (a book's chunks exclude the whole book: over-fetching up to 65,536 candidates per
                # query from HNSW did not finish on gutenberg in 23 minutes)
                more = short & (ineed > kk) & (exact is None)
                todo += [(int(v), ids[more & (ineed == v)], ilo[more & (ineed == v)], ihi[more & (ineed == v)],
                          ineed[more & (ineed == v)]) for v in np.unique(ineed[more])]
                last = short & ~more
                if not last.any():
                    continue
                if exact is not None:  # an approximate index found too few: search exactly around the range
                    D, I = exact(ids[last], ilo[last], ihi[last], k)
                    out_i[ids[last]], out_d[ids[last]] = np.where(I >= 0, I, -1), np.where(I >= 0, D, 0)
                elif kk < n_train:
                    grow = min(n_train, kk * 4)
                    todo.append((grow, ids[last], ilo[last], ihi[last], np.full(int(last.sum()), grow)))
        if progress is not None:
            progress(len(q))
    return out_i, out_d, int((out_i < 0).any(1).sum())


class DenseNeighbours(NamedTuple):
    """What ``dense_neighbours`` built: the index over the train vectors and every chunk's neighbours. The
    index stage's bm25 search (an exact ``BM25Index``) and a rerank refresh (no index) report the same way."""

    index: DenseIndex | BM25Index | None
    kind: str
    """The index kind built: ``kind`` as asked, or flat when its recall fell below the floor."""
    ids: np.ndarray
    scores: np.ndarray
    num_short: int
    recall: float
    """recall@10 of ``index`` against exact search on the same vectors (1.0 for flat)."""
    recall_queries: int
    build_seconds: float
    neighbours_seconds: float


def dense_neighbours(layout: ChunkLayout, vectors: np.ndarray, k: int, exclude_window: int,
                     exclude_same_document: bool, kind: str, seed: int = 0, progress: Progress = _no_progress,
                     recall_floor: float = 0.0, ef_search: int = 0, shards: int = 1,
                     shard_folder: Path | None = None) -> DenseNeighbours:
    """Index the train rows of ``vectors`` ((num_chunks, d) unit rows, any float dtype, memory-mapped or not) with
    a ``kind`` index and compute every chunk's ``k`` nearest allowed train chunks under the leakage rules. An
    approximate index whose recall@10 (at HNSW breadth ``ef_search``; 0: the default) falls below
    ``recall_floor`` is replaced by an exact one. With ``shards`` > 1 the index is written as that many per-range
    files into ``shard_folder`` and searched with a merge by score (``shards.ShardedIndex``)."""
    xb = vectors[: layout.num_train]
    t0 = time.perf_counter()
    build = build_dense_index
    if shards > 1:  # per-range faiss files under shard_folder, searched with a merge by score (shards.py)
        from knnformer.retrieval.shards import ShardedIndex

        def build(xb, kind, seed=0, progress=None):
            return ShardedIndex.build(xb, kind, shards, shard_folder, seed, progress)
    built = build(xb, kind, seed, progress("indexing", layout.num_train))
    if ef_search:
        built.ef_search = ef_search
    recall, recall_queries = measure_recall(built, xb, vectors, seed=seed)
    if recall < recall_floor and kind != "flat":
        logger.warning("the %s index's recall@10 %.3f is below the floor %.3f: using an exact index", kind, recall,
                       recall_floor)
        built, kind = build(xb, "flat", seed), "flat"
        recall = 1.0
    build_s = time.perf_counter() - t0

    def search(ids: np.ndarray, kk: int) -> SearchResult:
        return built.search(vectors[ids], kk)

    def exact(ids: np.ndarray, lo: np.ndarray, hi: np.ndarray, kk: int) -> SearchResult:
        return exact_search_excluding(xb, vectors[ids], kk, lo, hi)

    t1 = time.perf_counter()
    ids, scores, num_short = compute_neighbours(layout, search, k, exclude_window, exclude_same_document,
                                                progress=progress("neighbours", layout.num_chunks), exact=exact)
    return DenseNeighbours(built, kind, ids, scores, num_short, float(recall), recall_queries, build_s,
                           time.perf_counter() - t1)
