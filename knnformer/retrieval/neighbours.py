"""Neighbours: every chunk's K nearest train chunks, precomputed by ``knnformer index`` (``build.py``), read back
for the model, with the token ids it reads from them.

Files (in the datastore, or in a run's refresh folder): ``neighbours.npy`` ((num_chunks, K) int32 train chunk
ids, -1 where fewer than K were allowed) and ``neighbour_scores.npy`` ((num_chunks, K) float16, the index's
scores), nearest first, described by the manifest's ``retrieval.neighbours`` entry. How they are searched and
which chunks the leakage rules keep out is ``search.py``'s part.

Continuation: a neighbour hands over its own C tokens and its continuation's (``ChunkLayout.continuations``:
the next train chunk when the text goes on in the same document, else none), and the leakage rules hold for both.

The model side calls ``load_neighbours(datastore, expected_embedder, chunk_size, context)`` once, then
``Neighbours.for_windows(split, starts, length, k)`` per batch: the neighbours' tokens and continuations, padded,
with a mask; no search happens in the training loop.

The names the stage and its readers share live here too: the defaults (``DEFAULT_K``, ``DEFAULT_EMBEDDER``,
``DEFAULT_EXCLUDE_WINDOW``), the file names and ``Progress``, the callback every stage reports its work through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from knnformer.data.chunks import ChunkLayout, chunk_layout, read_retrieval_manifest
from knnformer.data.datastore import Datastore
from knnformer.io import checked_sha256, writing_file
from knnformer.retrieval.embedders import open_embeddings

logger = logging.getLogger(__name__)

DEFAULT_K = 8
DEFAULT_EMBEDDER = "bm25"
"""Cheapest embedder with real retrieval quality on this CPU (see the module docstring of ``embedders``)."""
DEFAULT_EXCLUDE_WINDOW = 2048
NEIGHBOURS_FILE, SCORES_FILE = "neighbours.npy", "neighbour_scores.npy"
MAX_PAST_CHUNKS = 4096
"""``retrieval.search.sources=past`` searches at most this many of a document's chunks before the window (the latest)."""
DENSE_INDEX_FILE, BM25_INDEX_DIR = "index.faiss", "index.bm25"

Progress = Callable[[str, int], Callable[[int], None]]
"""``progress(stage, total)`` returns the callback that gets counts of work done in that stage."""


def _no_progress(stage: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def _save_npy(path: Path, array: np.ndarray) -> None:
    with writing_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


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
            raise ValueError(f"retrieval.search.sources=train,past searches a document's past by its chunks' vectors, and "
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


def in_context_prefix(tokens: np.ndarray, mask: np.ndarray, k: int) -> list[np.ndarray]:
    """In-context retrieval's prefix: the real tokens of the first ``k`` neighbours of each row of ``tokens``
    (N, K, R) with ``mask``, concatenated with the nearest last (next to the text it serves)."""
    out = []
    for row_t, row_m in zip(tokens, mask):
        parts = [row_t[j][row_m[j]] for j in reversed(range(min(k, len(row_t))))]
        out.append(np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64))
    return out


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


def check_neighbour_ids(path: Path, ids: np.ndarray, num_train: int, block: int = 1 << 22) -> None:
    """Refuse neighbour ids that are not train chunks (-1 marks a missing neighbour)."""
    flat = ids.reshape(-1)
    for lo in range(0, len(flat), block):
        part = flat[lo : lo + block]
        if len(part) and (int(part.min()) < -1 or int(part.max()) >= num_train):
            raise ValueError(f"{path} holds neighbour ids outside the {num_train} train chunks "
                             f"({int(part.min())}..{int(part.max())}); rebuild with `knnformer index --force`")


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
            raise ValueError(f"{store.path} has no second-hop neighbours (retrieval.search.hops=2); build them with "
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
    if "sha256" in info:  # content, not only shape: read once per change of the file (io.checked_sha256)
        checked_sha256(store.path / info["file"], info["sha256"], f"{fix} --force`",
                       also=lambda: check_neighbour_ids(store.path / info["file"], ids, layout.num_train))
    emb = read_retrieval_manifest(store.path).get("embeddings")
    vectors = None
    if emb is not None and emb["fingerprint"] == info["embedder_fingerprint"] and emb["chunk_size"] == layout.chunk_size \
            and emb["count"] == layout.num_chunks and (store.path / emb["file"]).is_file():
        vectors = open_embeddings(store.path, emb)
    return Neighbours(store, layout, ids, scores, info, vectors)
