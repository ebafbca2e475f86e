"""Neighbours: every chunk's K nearest train chunks, precomputed, and the token ids the model reads from them.

``index_datastore`` runs the whole stage (chunks -> embeddings -> index -> neighbours) and writes
``neighbours.npy`` ((num_chunks, K) int32 train chunk ids, -1 where fewer than K were allowed) and
``neighbour_scores.npy`` ((num_chunks, K) float16, the index's scores), nearest first.

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

Continuation: a neighbour hands over its own C tokens and its continuation's (``ChunkLayout.continuations``:
the next train chunk when the text goes on in the same document, else none), and the leakage rules hold for both.

The model side calls ``load_neighbours(datastore, expected_embedder, chunk_size, context)`` once, then
``Neighbours.for_windows(split, starts, length, k)`` per batch: the neighbours' tokens and continuations, padded,
with a mask; no search happens in the training loop.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from knnformer.chunks import (DEFAULT_CHUNK_SIZE, ChunkLayout, chunk_layout, chunk_texts, read_retrieval_manifest,
                              tmp_path, update_retrieval_manifest)
from knnformer.datastore import Datastore
from knnformer.embedders import chunks_to_embeddings, make_embedder, open_embeddings
from knnformer.index import (DEFAULT_MEMORY_BUDGET, INDEX_KINDS, BM25Index, DenseIndex, SearchResult,
                             build_dense_index, choose_index_kind, exact_search_excluding, measure_recall, path_size)

logger = logging.getLogger(__name__)

DEFAULT_K = 8
DEFAULT_EMBEDDER = "bm25"
"""Cheapest embedder with real retrieval quality on this CPU (see the module docstring of ``embedders``)."""
DEFAULT_EXCLUDE_WINDOW = 2048
NEIGHBOURS_FILE, SCORES_FILE = "neighbours.npy", "neighbour_scores.npy"
MAX_PAST_CHUNKS = 4096
"""``retrieval.sources=past`` searches at most this many of a document's chunks before the window (the latest)."""
DENSE_INDEX_FILE, BM25_INDEX_DIR = "index.faiss", "index.bm25"

Progress = Callable[[str, int], Callable[[int], None]]
"""``progress(stage, total)`` returns the callback that gets counts of work done in that stage."""


def _no_progress(stage: str, total: int) -> Callable[[int], None]:
    return lambda n: None


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


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class DenseNeighbours(NamedTuple):
    """What ``dense_neighbours`` built: the index over the train vectors and every chunk's neighbours."""

    index: DenseIndex
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
                     recall_floor: float = 0.0, ef_search: int = 0) -> DenseNeighbours:
    """Index the train rows of ``vectors`` ((num_chunks, d) unit rows, any float dtype, memory-mapped or not) with
    a ``kind`` index and compute every chunk's ``k`` nearest allowed train chunks under the leakage rules. An
    approximate index whose recall@10 (at HNSW breadth ``ef_search``; 0: the default) falls below
    ``recall_floor`` is replaced by an exact one."""
    xb = vectors[: layout.num_train]
    t0 = time.perf_counter()
    built = build_dense_index(xb, kind, seed, progress("indexing", layout.num_train))
    if ef_search:
        built.ef_search = ef_search
    recall, recall_queries = measure_recall(built, xb, vectors, seed=seed)
    if recall < recall_floor and kind != "flat":
        logger.warning("the %s index's recall@10 %.3f is below the floor %.3f: using an exact index", kind, recall,
                       recall_floor)
        built, kind = build_dense_index(xb, "flat", seed), "flat"
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


# ---------------------------------------------------------------- the stage

def index_datastore(path: str | Path, embedder: str = DEFAULT_EMBEDDER, index: str = "auto", k: int = DEFAULT_K,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, exclude_window: int = DEFAULT_EXCLUDE_WINDOW,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET, force: bool = False, seed: int = 0,
                    progress: Progress = _no_progress, hops: int = 1) -> dict:
    """Chunk, embed, index and precompute neighbours for the datastore at ``path``; returns the manifest's
    ``retrieval`` section. Embeddings are reused when the manifest matches (``force`` recomputes them). With
    ``hops=2`` the second hop's neighbours are computed too and written beside the first's (see hops.py)."""
    store = Datastore.open(path)
    layout = chunk_layout(store, chunk_size)
    if layout.num_train == 0:
        raise ValueError(f"the train split of {store.path} is empty: there is nothing to retrieve from; re-run "
                         "`knnformer prepare` with a smaller --valid-fraction/--test-fraction")
    if not 1 <= k <= layout.num_train:
        raise ValueError(f"--k {k} must be between 1 and the {layout.num_train} train chunks of {store.path}; "
                         "lower --k or --chunk-size")
    if exclude_window < 0:
        raise ValueError(f"--exclude-window must be >= 0, got {exclude_window}")
    if index not in INDEX_KINDS:
        raise ValueError(f"unknown --index {index!r}; pick one of {', '.join(INDEX_KINDS)}")
    if hops not in (1, 2):
        raise ValueError(f"--hops must be 1 or 2, got {hops}")
    emb = make_embedder(embedder)
    from knnformer.hops import HOP2_FILE, HOP2_SCORES_FILE, second_hop, second_hop_texts

    tok_fp = store.manifest["tokenizer"]["fingerprint"]
    train_ids = np.arange(layout.num_train)
    t0 = time.perf_counter()
    single = int(store.manifest["splits"]["train"]["documents"]) <= 1
    if emb.sparse:
        if index not in ("auto", "flat"):
            raise ValueError(f"--index {index} is for dense embedders; bm25 has its own exact index (use --index auto)")
        kind = "bm25"
        built = BM25Index.build(chunk_texts(store, layout, train_ids))
        progress("indexing", layout.num_train)(layout.num_train)
        build_s = time.perf_counter() - t0
        recall, recall_queries = 1.0, 0

        def search(ids: np.ndarray, kk: int) -> SearchResult:
            return built.search(chunk_texts(store, layout, ids), kk)

        t1 = time.perf_counter()
        ids, scores, num_short = compute_neighbours(layout, search, k, exclude_window, not single,
                                                    progress=progress("neighbours", layout.num_chunks))
        neighbours_s = time.perf_counter() - t1

        def search_hop2(q: np.ndarray, kk: int) -> SearchResult:
            return built.search(second_hop_texts(store, layout, q, ids[q, 0]), kk)

        exact_hop2 = None
    else:
        vectors, reused = chunks_to_embeddings(store, layout, emb, force, progress=progress("embedding", layout.num_chunks))
        kind = choose_index_kind(layout.num_train, emb.dim, memory_budget) if index == "auto" else index
        dense = dense_neighbours(layout, vectors, k, exclude_window, not single, kind, seed, progress=progress)
        built, ids, scores, num_short = dense.index, dense.ids, dense.scores, dense.num_short
        recall, recall_queries, build_s, neighbours_s = (dense.recall, dense.recall_queries, dense.build_seconds,
                                                         dense.neighbours_seconds)
        if hops == 2:  # the second hop's query vectors, every chunk's (float32 in memory)
            first = ids[:, 0]
            joined = np.concatenate([emb.embed(second_hop_texts(store, layout, q, first[q])) for q in
                                     np.array_split(np.arange(layout.num_chunks), -(-layout.num_chunks // 1024))])

            def search_hop2(q: np.ndarray, kk: int) -> SearchResult:
                return built.search(joined[q], kk)

            def exact_hop2(q: np.ndarray, lo: np.ndarray, hi: np.ndarray, kk: int) -> SearchResult:
                return exact_search_excluding(vectors[: layout.num_train], joined[q], kk, lo, hi)
    if num_short:
        logger.warning("%d chunks have fewer than %d allowed neighbours (padded with -1)", num_short, k)
    hop2 = None
    if hops == 2:
        t2 = time.perf_counter()
        hop2 = second_hop(layout, ids, scores, search_hop2, k, exclude_window, not single, exact_hop2)
        hop2_s = time.perf_counter() - t2

    # all computed: now replace the files and the manifest entries, the entries last
    index_file = BM25_INDEX_DIR if emb.sparse else DENSE_INDEX_FILE
    update_retrieval_manifest(store.path, drop=("index", "neighbours", "neighbours_hop2"))
    built.save(store.path / index_file)
    _save_npy(store.path / NEIGHBOURS_FILE, ids)
    _save_npy(store.path / SCORES_FILE, scores)
    if hop2 is not None:
        _save_npy(store.path / HOP2_FILE, hop2[0])
        _save_npy(store.path / HOP2_SCORES_FILE, hop2[1])
    other = store.path / (DENSE_INDEX_FILE if emb.sparse else BM25_INDEX_DIR)
    if other.is_dir():
        import shutil

        shutil.rmtree(other)
    elif other.exists():
        other.unlink()
    common = {"embedder": emb.name, "embedder_fingerprint": emb.fingerprint(), "tokenizer_fingerprint": tok_fp,
              "chunk_size": chunk_size}
    return update_retrieval_manifest(store.path, {
        "chunks": layout.describe(),
        "index": {**common, "kind": kind, "file": index_file, "dim": emb.dim, "num_vectors": layout.num_train,
                  "recall_at_10": round(float(recall), 4), "recall_queries": recall_queries,
                  "build_seconds": round(build_s, 3),
                  "bytes_per_chunk": round(path_size(store.path / index_file) / layout.num_train, 1),
                  "memory_budget": memory_budget},
        "neighbours": {**common, "file": NEIGHBOURS_FILE, "scores_file": SCORES_FILE, "k": k,
                       "num_chunks": layout.num_chunks, "index_kind": kind, "exclude_window": exclude_window,
                       "exclude_same_document": not single, "num_short_rows": num_short,
                       "seconds": round(neighbours_s, 3), "hops": 1},
        **({"neighbours_hop2": {"file": HOP2_FILE, "scores_file": HOP2_SCORES_FILE, "hops": 2,
                                "merge": "first hop's top neighbour, then the second hop's results",
                                "num_short_rows": hop2[2], "seconds": round(hop2_s, 3)}} if hop2 else {}),
    })


# ---------------------------------------------------------------- reading neighbours back

class NeighbourBatch(NamedTuple):
    """What the model reads for a batch of query chunks (shape ``S`` = the shape of the chunk ids asked for)."""

    tokens: np.ndarray
    """(*S, k, 2C) int64: each neighbour's C tokens, then its continuation's C tokens, padded with ``pad_id``."""
    mask: np.ndarray
    """(*S, k, 2C) bool: true where ``tokens`` holds a real token."""
    ids: np.ndarray
    """(*S, k) int64 neighbour chunk ids, -1 for none (a missing neighbour, or a query chunk id of -1)."""
    scores: np.ndarray
    """(*S, k) float32 the index's scores (cosine for dense embedders, BM25 score for bm25)."""


@dataclass
class Neighbours:
    """Precomputed neighbours of a datastore; ``ids`` and ``scores`` are memory-mapped, tokens read on demand."""

    store: Datastore
    layout: ChunkLayout
    ids: np.ndarray
    scores: np.ndarray
    info: dict
    vectors: np.ndarray | None = None
    """(num_chunks, d) the unit vectors the neighbours were searched with (for ``past``); None for bm25."""
    folder: Path | None = None
    """The folder holding ``info["file"]``: the datastore's, or a run's refresh folder (None: the datastore's)."""

    @property
    def ids_path(self) -> Path:
        """The file the ids were read from (what identifies these neighbours)."""
        return (self.folder or self.store.path) / self.info["file"]

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    @property
    def chunk_size(self) -> int:
        return self.layout.chunk_size

    def window_chunk_ids(self, split: str, starts, length: int, previous: bool = False) -> np.ndarray:
        """(B, ceil(length / C)) chunk ids of the windows ``[start, start + length)`` of ``split``, whose starts
        (positions in ``tokens.bin``) must lie on the split's chunk grid. Row u is window chunk u; with
        ``previous`` it is the chunk before window chunk u instead (the one that ends where chunk u begins, so
        all of chunk u may attend to its neighbours). -1 where that chunk lies outside the split."""
        lo_tok, _ = self.store.split_range(split)
        lo, hi = self.layout.split_chunks[split]
        starts = np.asarray(starts, dtype=np.int64)
        off = starts - lo_tok
        if np.any(off % self.chunk_size) or np.any(off < 0):
            raise ValueError(f"window starts must be {split}'s first token plus a multiple of the chunk size "
                             f"{self.chunk_size}; sample starts on the chunk grid")
        u = np.arange(-(-length // self.chunk_size)) - int(previous)
        ids = lo + off[:, None] // self.chunk_size + u[None, :]
        return np.where((ids >= lo) & (ids < hi), ids, -1)

    def for_chunks(self, chunk_ids, k: int | None = None, pad_id: int = 0) -> NeighbourBatch:
        """The first ``k`` neighbours of each chunk id (any shape; -1 gives an all-masked row)."""
        k = self.k if k is None else k
        if k > self.k:
            raise ValueError(f"{k} neighbours asked for, but {self.store.path} holds {self.k}; rebuild with "
                             f"`knnformer index {self.store.path} --k {k}`")
        q = np.asarray(chunk_ids, dtype=np.int64)
        nid = np.where(q[..., None] >= 0, self.ids[np.maximum(q, 0)][..., :k], -1).astype(np.int64)
        score = np.where(nid >= 0, self.scores[np.maximum(q, 0)][..., :k], 0).astype(np.float32)
        tokens, mask = neighbour_tokens(self.store, self.layout, nid, pad_id)
        return NeighbourBatch(tokens, mask, nid, score)

    def with_past(self, chunk_ids: np.ndarray, window_first: np.ndarray, k: int | None = None,
                  pad_id: int = 0) -> NeighbourBatch:
        """``for_chunks(chunk_ids, k)`` (B, S) merged by score with the query chunk's own past: the chunks of its
        document that lie before both the window (its first chunk id ``window_first`` (B,)) and the query
        chunk itself, searched exactly with ``vectors`` (the last ``MAX_PAST_CHUNKS`` of them). A past neighbour's
        continuation is handed over only when it too lies before both, so no neighbour ever holds the query
        chunk, the window or anything after them. Past chunks of valid or test are that split's own text that
        the model has already read, not leakage."""
        k = self.k if k is None else k
        if self.vectors is None:
            raise ValueError(f"retrieval.sources=train,past searches a document's past by its chunks' vectors, and "
                             f"the neighbours of {self.store.path} have none (bm25); index with a dense embedder "
                             f"(`knnformer index {self.store.path} --embedder minilm`) or use a learned retriever")
        train = self.for_chunks(chunk_ids, k, pad_id)
        q = np.asarray(chunk_ids, dtype=np.int64)
        B, S = q.shape
        pid, pcont = np.full((B, S, k), -1, np.int64), np.full((B, S, k), -1, np.int64)
        pscore = np.full((B, S, k), -np.inf, np.float32)
        layout = self.layout
        for b, s in zip(*np.nonzero(q >= 0)):
            limit = min(int(window_first[b]), int(q[b, s]))
            first = max(int(layout.chunk_of(layout.doc_starts[layout.doc_first[q[b, s]]])), limit - MAX_PAST_CHUNKS)
            if limit <= first:
                continue
            cand = np.arange(first, limit)
            scores = np.asarray(self.vectors[cand], np.float32) @ np.asarray(self.vectors[q[b, s]], np.float32)
            top = np.argsort(-scores, kind="stable")[:k]
            nxt = cand[top] + 1
            starts_doc = layout.doc_starts[layout.doc_first[np.minimum(nxt, layout.num_chunks - 1)]] == layout.starts[
                np.minimum(nxt, layout.num_chunks - 1)]
            pid[b, s, : len(top)], pscore[b, s, : len(top)] = cand[top], scores[top]
            pcont[b, s, : len(top)] = np.where((nxt < limit) & ~starts_doc, nxt, -1)
        tscore = np.where(train.ids >= 0, train.scores, -np.inf)
        tcont = np.where(train.ids >= 0, layout.continuations(np.maximum(train.ids, 0)), -1)
        ids, scores = np.concatenate([train.ids, pid], -1), np.concatenate([tscore, pscore], -1)
        order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]  # nearest first; a tie keeps train first
        ids, scores = np.take_along_axis(ids, order, -1), np.take_along_axis(scores, order, -1)
        cont = np.take_along_axis(np.concatenate([tcont, pcont], -1), order, -1)
        ids = np.where(np.isfinite(scores), ids, -1)
        tokens, mask = neighbour_tokens(self.store, layout, ids, pad_id, cont)
        return NeighbourBatch(tokens, mask, ids, np.where(ids >= 0, scores, 0).astype(np.float32))

    def for_windows(self, split: str, starts, length: int, k: int | None = None, previous: bool = False,
                    pad_id: int = 0) -> NeighbourBatch:
        """``for_chunks(window_chunk_ids(split, starts, length, previous), k)``: shapes (B, U, k, 2C)."""
        return self.for_chunks(self.window_chunk_ids(split, starts, length, previous), k, pad_id)


def neighbour_tokens(store: Datastore, layout: ChunkLayout, nid: np.ndarray, pad_id: int = 0,
                     cont: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of chunks ``nid`` (any shape, -1 = none) and of their continuations ``cont`` (default: each train
    chunk's, ``ChunkLayout.continuations``; -1 = none): (*S, 2C) and a mask."""
    C = layout.chunk_size
    n = np.maximum(nid, 0)
    cont = np.where(nid >= 0, layout.continuations(n) if cont is None else cont, -1)
    ar = np.arange(C)
    pos = np.concatenate([layout.starts[n][..., None] + ar, layout.starts[np.maximum(cont, 0)][..., None] + ar], -1)
    mask = np.concatenate([(nid[..., None] >= 0) & (pos[..., :C] < layout.ends[n][..., None]),
                           (cont[..., None] >= 0) & (pos[..., C:] < layout.ends[np.maximum(cont, 0)][..., None])], -1)
    flat = np.where(mask, pos, 0).reshape(-1)
    tokens = np.asarray(store.tokens[flat], dtype=np.int64).reshape(pos.shape) if flat.size else np.zeros(pos.shape, np.int64)
    return np.where(mask, tokens, pad_id), mask


def load_neighbours(datastore: str | Path | Datastore, expected_embedder: str | None = None,
                    chunk_size: int | None = None, context: int | None = None, hops: int = 1) -> Neighbours:
    """Open a datastore's precomputed neighbours (those after the second hop for ``hops=2``), refusing them
    (ValueError naming the fix) when they were built with another embedder (name or fingerprint), tokenizer or
    chunk size, for another state of the datastore, or with an ``exclude_window`` shorter than ``context`` plus
    one chunk (a training window could then see a neighbour taken from inside itself)."""
    store = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore)
    info = read_retrieval_manifest(store.path).get("neighbours")
    fix = f"`knnformer index {store.path}"
    if info is None:
        raise ValueError(f"{store.path} has no neighbours; build them with {fix}`")
    if hops == 2:
        hop2 = read_retrieval_manifest(store.path).get("neighbours_hop2")
        if hop2 is None:
            raise ValueError(f"{store.path} has no second-hop neighbours (retrieval.hops=2); build them with "
                             f"{fix} --embedder {info['embedder']} --hops 2`")
        info = {**info, **hop2}
    if info["tokenizer_fingerprint"] != store.manifest["tokenizer"]["fingerprint"]:
        raise ValueError(f"the neighbours in {store.path} were built with another tokenizer; rebuild with {fix} --force`")
    if expected_embedder is not None and expected_embedder not in (info["embedder"], info["embedder_fingerprint"]):
        raise ValueError(f"the neighbours in {store.path} were built with embedder {info['embedder']!r}, not "
                         f"{expected_embedder!r}; rebuild with {fix} --embedder {expected_embedder}`")
    if chunk_size is not None and chunk_size != info["chunk_size"]:
        raise ValueError(f"the neighbours in {store.path} were built with chunk size {info['chunk_size']}, not "
                         f"{chunk_size}; rebuild with {fix} --chunk-size {chunk_size}`")
    layout = chunk_layout(store, info["chunk_size"])
    if context is not None and info["exclude_window"] < context + layout.chunk_size:
        raise ValueError(f"the neighbours in {store.path} exclude only {info['exclude_window']} tokens around each "
                         f"train chunk, less than the context {context} plus a chunk; rebuild with {fix} "
                         f"--exclude-window {context + layout.chunk_size}`")
    try:
        ids = np.load(store.path / info["file"], mmap_mode="r")
        scores = np.load(store.path / info["scores_file"], mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ValueError(f"the neighbours in {store.path} are unreadable ({e}); rebuild with {fix} --force`") from None
    if ids.shape != (layout.num_chunks, info["k"]) or scores.shape != ids.shape or info["num_chunks"] != layout.num_chunks:
        raise ValueError(f"{store.path}/{info['file']} does not match the datastore's {layout.num_chunks} chunks; "
                         f"rebuild with {fix} --force`")
    emb = read_retrieval_manifest(store.path).get("embeddings")
    vectors = None
    if emb is not None and emb["fingerprint"] == info["embedder_fingerprint"] and emb["chunk_size"] == layout.chunk_size \
            and emb["count"] == layout.num_chunks and (store.path / emb["file"]).is_file():
        vectors = open_embeddings(store.path, emb)
    return Neighbours(store, layout, ids, scores, info, vectors)


def open_index(store: Datastore) -> DenseIndex | BM25Index:
    """The saved index of a datastore (memory-mapped), for live retrieval at generation time."""
    info = read_retrieval_manifest(store.path).get("index")
    if info is None:
        raise ValueError(f"{store.path} has no index; build it with `knnformer index {store.path}`")
    if info["kind"] == "bm25":
        return BM25Index.load(store.path / info["file"])
    return DenseIndex.load(store.path / info["file"], info["kind"])


@dataclass
class Retriever:
    """Live retrieval for text the datastore does not hold (generation): embed, search, gather tokens."""

    store: Datastore
    layout: ChunkLayout
    index: DenseIndex | BM25Index
    embedder: object
    hops: int = 1
    """1, or 2 for a run trained with ``retrieval.hops=2`` (see ``neighbours``)."""

    def search(self, texts: list[str], k: int) -> SearchResult:
        """The ``k`` nearest train chunks of each text."""
        return self.index.search(texts if self.embedder.sparse else self.embedder.embed(texts), k)

    def neighbours(self, texts: list[str], k: int, pad_id: int = 0) -> NeighbourBatch:
        """Like ``Neighbours.for_chunks`` for chunks of new text: (len(texts), k, 2C) tokens and mask. With
        ``hops`` = 2, as the run was trained: the first hop's top neighbour, then the second hop's results (its
        query: the text joined with that neighbour's text), as ``hops.merge_hops`` orders them."""
        D, I = self.search(texts, k)
        if self.hops == 2:
            from knnformer.hops import merge_hops

            first = chunk_texts(self.store, self.layout, np.maximum(I[:, 0], 0))
            D2, I2 = self.search([t + f if i >= 0 else t for t, f, i in zip(texts, first, I[:, 0])], k)
            I, D = merge_hops(I, D, I2, D2, k)
            I, D = I.astype(np.int64), D.astype(np.float32)
        tokens, mask = neighbour_tokens(self.store, self.layout, I, pad_id)
        return NeighbourBatch(tokens, mask, I, np.where(I >= 0, D, 0).astype(np.float32))


def open_retriever(datastore: str | Path | Datastore) -> Retriever:
    """The datastore's index with the embedder that built it (refused if that embedder has changed since)."""
    store = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore)
    info = read_retrieval_manifest(store.path).get("index")
    if info is None:
        raise ValueError(f"{store.path} has no index; build it with `knnformer index {store.path}`")
    embedder = make_embedder(info["embedder"])
    if embedder.fingerprint() != info["embedder_fingerprint"]:
        raise ValueError(f"the index of {store.path} was built by another version of embedder {info['embedder']!r}; "
                         f"rebuild with `knnformer index {store.path} --embedder {info['embedder']} --force`")
    return Retriever(store, chunk_layout(store, info["chunk_size"]), open_index(store), embedder)
