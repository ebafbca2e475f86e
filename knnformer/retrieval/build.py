"""The ``knnformer index`` stage: ``index_datastore`` chunks a datastore, embeds the chunks (reusing stored
embeddings when they match), builds the index over the train chunks, computes every chunk's neighbours under
the leakage rules (``search.py``), optionally their second hop (``hops.py``), and writes ``index.faiss`` or
``index.bm25/`` and the neighbour arrays (``neighbours.py``). Everything is computed before anything is
replaced, and the manifest's ``retrieval`` entries are written last, so they only ever name complete files.

It is the top of ``retrieval``: it uses embedders, index, search and hops, and nothing in ``retrieval`` uses it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from knnformer.data.chunks import DEFAULT_CHUNK_SIZE, ChunkLayout, chunk_layout, chunk_texts, update_retrieval_manifest
from knnformer.data.datastore import Datastore
from knnformer.io import file_sha256, path_size, tmp_path
from knnformer.retrieval.embedders import chunks_to_embeddings, make_embedder
from knnformer.retrieval.hops import HOP2_FILE, HOP2_SCORES_FILE, second_hop, second_hop_texts
from knnformer.retrieval.index import (
    DEFAULT_MEMORY_BUDGET,
    INDEX_KINDS,
    BM25Index,
    SearchResult,
    choose_index_kind,
    exact_search_excluding,
)
from knnformer.retrieval.neighbours import (
    BM25_INDEX_DIR,
    DEFAULT_EMBEDDER,
    DEFAULT_EXCLUDE_WINDOW,
    DEFAULT_K,
    DENSE_INDEX_FILE,
    NEIGHBOURS_FILE,
    SCORES_FILE,
    Progress,
    _no_progress,
    _save_npy,
)
from knnformer.retrieval.search import DenseNeighbours, compute_neighbours, dense_neighbours
from knnformer.retrieval.shards import SHARDED_INDEX_DIR

logger = logging.getLogger(__name__)

HopSearch = Callable[[np.ndarray, int], SearchResult]
"""``search(ids, kk)``: the ``kk`` nearest train chunks of the query chunks ``ids`` (see ``compute_neighbours``)."""
ExactSearch = Callable[[np.ndarray, np.ndarray, np.ndarray, int], SearchResult]
"""``exact(ids, lo, hi, kk)``: exact search that skips each query's excluded range ``[lo, hi)``."""


def index_datastore(path: str | Path, embedder: str = DEFAULT_EMBEDDER, index: str = "auto", k: int = DEFAULT_K,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, exclude_window: int = DEFAULT_EXCLUDE_WINDOW,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET, force: bool = False, seed: int = 0,
                    progress: Progress = _no_progress, hops: int = 1, device: str = "cpu",
                    neighbours: bool = True, shards: int = 1) -> dict:
    """Chunk, embed, index and precompute neighbours for the datastore at ``path``; returns the manifest's
    ``retrieval`` section. Embeddings are reused when the manifest matches (``force`` recomputes them). With
    ``hops=2`` the second hop's neighbours are computed too and written beside the first's (see hops.py).
    ``neighbours=False`` builds the index alone (a retrieval database, searched live: ``database.py``). With
    ``shards`` > 1 the dense index is written as that many per-range faiss files (``index.shards/``, shards.py)."""
    store = Datastore.open(path)
    layout = chunk_layout(store, chunk_size)
    _check_arguments(store, layout, index, k if neighbours else 1, exclude_window, hops)
    emb = make_embedder(embedder, device)
    if shards < 1 or (shards > 1 and emb.sparse):
        raise ValueError(f"--shards {shards}: " + ("must be at least 1" if shards < 1 else
                                                   f"{embedder} has its own exact bm25 index, which is not sharded"))
    if not neighbours:
        if hops != 1:
            raise ValueError("--hops 2 computes neighbours; drop --no-neighbours")
        return _index_only(store, layout, emb, index, memory_budget, force, seed, progress, shards)
    single = int(store.manifest["splits"]["train"]["documents"]) <= 1
    if emb.sparse:
        found, search_hop2, exact_hop2 = _bm25_neighbours(store, layout, index, k, exclude_window, not single, progress)
    else:
        found, search_hop2, exact_hop2 = _dense_neighbours(store, layout, emb, index, k, exclude_window, not single,
                                                           memory_budget, force, seed, progress, hops, shards)
    if found.num_short:
        logger.warning("%d chunks have fewer than %d allowed neighbours (padded with -1)", found.num_short, k)
    hop2, hop2_s = None, 0.0
    if hops == 2:
        t2 = time.perf_counter()
        hop2 = second_hop(layout, found.ids, found.scores, search_hop2, k, exclude_window, not single, exact_hop2)
        hop2_s = time.perf_counter() - t2

    # all computed: write the new files under temporary names (a kill here keeps the previous index whole), then
    # drop the old manifest entries, rename the files into place and write the new entries last
    index_file = BM25_INDEX_DIR if emb.sparse else SHARDED_INDEX_DIR if shards > 1 else DENSE_INDEX_FILE
    staged = _stage_files(store.path, emb.sparse, found, hop2, index_file)
    sums = {name: file_sha256(tmp) for name, tmp in staged.items() if name != index_file}
    update_retrieval_manifest(store.path, drop=("index", "neighbours", "neighbours_hop2"))
    _swap_in(store.path, emb.sparse, staged, index_file)
    common = {"embedder": emb.name, "embedder_fingerprint": emb.fingerprint(),
              "tokenizer_fingerprint": store.manifest["tokenizer"]["fingerprint"], "chunk_size": chunk_size}
    return update_retrieval_manifest(store.path, {
        "chunks": layout.describe(),
        "index": {**common, "kind": found.kind, "file": index_file, "dim": emb.dim, "num_vectors": layout.num_train,
                  "recall_at_10": round(float(found.recall), 4), "recall_queries": found.recall_queries,
                  "build_seconds": round(found.build_seconds, 3),
                  "bytes_per_chunk": round(path_size(store.path / index_file) / layout.num_train, 1),
                  "memory_budget": memory_budget, **({"shards": shards} if shards > 1 else {})},
        "neighbours": {**common, "file": NEIGHBOURS_FILE, "scores_file": SCORES_FILE, "k": k,
                       "sha256": sums[NEIGHBOURS_FILE],
                       "num_chunks": layout.num_chunks, "index_kind": found.kind, "exclude_window": exclude_window,
                       "exclude_same_document": not single, "num_short_rows": found.num_short,
                       "seconds": round(found.neighbours_seconds, 3), "hops": 1},
        **({"neighbours_hop2": {"file": HOP2_FILE, "scores_file": HOP2_SCORES_FILE, "hops": 2,
                                "sha256": sums[HOP2_FILE],
                                "merge": "first hop's top neighbour, then the second hop's results",
                                "num_short_rows": hop2[2], "seconds": round(hop2_s, 3)}} if hop2 else {}),
    })


def _index_only(store: Datastore, layout: ChunkLayout, emb, index: str, memory_budget: int, force: bool, seed: int,
                progress: Progress, shards: int = 1) -> dict:
    """The index over the train chunks and its manifest entry, without anyone's neighbours (the manifest's
    ``neighbours`` entries are dropped: they would describe another index)."""
    from knnformer.retrieval.index import build_dense_index, measure_recall

    t0 = time.perf_counter()
    if emb.sparse:
        if index not in ("auto", "flat"):
            raise ValueError(f"--index {index} is for dense embedders; bm25 has its own exact index (use --index auto)")
        built, kind, recall, queries = BM25Index.build(chunk_texts(store, layout, np.arange(layout.num_train))), \
            "bm25", 1.0, 0
        progress("indexing", layout.num_train)(layout.num_train)
    else:
        vectors, _ = chunks_to_embeddings(store, layout, emb, force, progress=progress("embedding", layout.num_chunks))
        kind = choose_index_kind(layout.num_train, emb.dim, memory_budget) if index == "auto" else index
        if shards > 1:  # per-range files, searched with a merge by score (shards.py)
            from knnformer.retrieval.shards import ShardedIndex

            built = ShardedIndex.build(vectors[: layout.num_train], kind, shards,
                                       tmp_path(store.path / SHARDED_INDEX_DIR), seed,
                                       progress("indexing", layout.num_train))
        else:
            built = build_dense_index(vectors[: layout.num_train], kind, seed, progress("indexing", layout.num_train))
        recall, queries = measure_recall(built, vectors[: layout.num_train], vectors, seed=seed)
    build_s = time.perf_counter() - t0
    found = DenseNeighbours(built, kind, None, None, 0, float(recall), queries, build_s, 0.0)
    index_file = BM25_INDEX_DIR if emb.sparse else SHARDED_INDEX_DIR if shards > 1 else DENSE_INDEX_FILE
    staged = _stage_files(store.path, emb.sparse, found, None, index_file)
    update_retrieval_manifest(store.path, drop=("index", "neighbours", "neighbours_hop2"))
    _swap_in(store.path, emb.sparse, staged, index_file)
    return update_retrieval_manifest(store.path, {
        "chunks": layout.describe(),
        "index": {"embedder": emb.name, "embedder_fingerprint": emb.fingerprint(),
                  "tokenizer_fingerprint": store.manifest["tokenizer"]["fingerprint"], "chunk_size": layout.chunk_size,
                  "kind": kind, "file": index_file, "dim": emb.dim, "num_vectors": layout.num_train,
                  "recall_at_10": round(float(recall), 4), "recall_queries": queries, "build_seconds": round(build_s, 3),
                  "bytes_per_chunk": round(path_size(store.path / index_file) / layout.num_train, 1),
                  "memory_budget": memory_budget, **({"shards": shards} if shards > 1 else {})},
    })


def _check_arguments(store: Datastore, layout: ChunkLayout, index: str, k: int, exclude_window: int,
                     hops: int) -> None:
    """Refuse (ValueError naming the fix) arguments the stage cannot honour on this datastore."""
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


def _bm25_neighbours(store: Datastore, layout: ChunkLayout, index: str, k: int, exclude_window: int,
                     exclude_same_document: bool, progress: Progress) -> tuple[DenseNeighbours, HopSearch, None]:
    """bm25: index the train chunk texts and search every chunk's text; the second hop searches with the
    chunk's text joined with its first neighbour's. The index is exact, so recall is 1."""
    if index not in ("auto", "flat"):
        raise ValueError(f"--index {index} is for dense embedders; bm25 has its own exact index (use --index auto)")
    t0 = time.perf_counter()
    built = BM25Index.build(chunk_texts(store, layout, np.arange(layout.num_train)))
    progress("indexing", layout.num_train)(layout.num_train)
    build_s = time.perf_counter() - t0

    def search(ids: np.ndarray, kk: int) -> SearchResult:
        return built.search(chunk_texts(store, layout, ids), kk)

    t1 = time.perf_counter()
    ids, scores, num_short = compute_neighbours(layout, search, k, exclude_window, exclude_same_document,
                                                progress=progress("neighbours", layout.num_chunks))
    neighbours_s = time.perf_counter() - t1

    def search_hop2(q: np.ndarray, kk: int) -> SearchResult:
        return built.search(second_hop_texts(store, layout, q, ids[q, 0]), kk)

    return DenseNeighbours(built, "bm25", ids, scores, num_short, 1.0, 0, build_s, neighbours_s), search_hop2, None


def _dense_neighbours(store: Datastore, layout: ChunkLayout, emb, index: str, k: int, exclude_window: int,
                      exclude_same_document: bool, memory_budget: int, force: bool, seed: int, progress: Progress,
                      hops: int, shards: int = 1) -> tuple[DenseNeighbours, HopSearch | None, ExactSearch | None]:
    """A dense embedder: embed every chunk (reusing stored embeddings that match), index the train vectors with
    ``index`` (``auto``: by size and ``memory_budget``) and search every chunk's vector. With ``hops=2`` every
    chunk's second-hop query (its text joined with its first neighbour's) is embedded too, held in float32."""
    vectors, _ = chunks_to_embeddings(store, layout, emb, force, progress=progress("embedding", layout.num_chunks))
    kind = choose_index_kind(layout.num_train, emb.dim, memory_budget) if index == "auto" else index
    dense = dense_neighbours(layout, vectors, k, exclude_window, exclude_same_document, kind, seed,
                             progress=progress, shards=shards, shard_folder=tmp_path(store.path / SHARDED_INDEX_DIR))
    search_hop2 = exact_hop2 = None
    if hops == 2:
        first = dense.ids[:, 0]
        joined = np.concatenate([emb.embed(second_hop_texts(store, layout, q, first[q])) for q in
                                 np.array_split(np.arange(layout.num_chunks), -(-layout.num_chunks // 1024))])

        def search_hop2(q: np.ndarray, kk: int) -> SearchResult:
            return dense.index.search(joined[q], kk)

        def exact_hop2(q: np.ndarray, lo: np.ndarray, hi: np.ndarray, kk: int) -> SearchResult:
            return exact_search_excluding(vectors[: layout.num_train], joined[q], kk, lo, hi)

    return dense, search_hop2, exact_hop2


def _stage_files(folder: Path, sparse: bool, found: DenseNeighbours,
                 hop2: tuple[np.ndarray, np.ndarray, int] | None, index_file: str | None = None) -> dict[str, Path]:
    """Write the index and the neighbour arrays beside their final names in ``folder`` as temporaries
    (``.NAME.tmp-PID``, which the next writer removes if this process dies); returns ``{final name: temporary}``."""
    arrays = {} if found.ids is None else {NEIGHBOURS_FILE: found.ids, SCORES_FILE: found.scores}
    if hop2 is not None:
        arrays.update({HOP2_FILE: hop2[0], HOP2_SCORES_FILE: hop2[1]})
    index_file = index_file or (BM25_INDEX_DIR if sparse else DENSE_INDEX_FILE)
    staged = {name: tmp_path(folder / name) for name in (index_file, *arrays)}
    found.index.save(staged[index_file])
    for name, array in arrays.items():
        _save_npy(staged[name], array)
    return staged


def _swap_in(folder: Path, sparse: bool, staged: dict[str, Path], index_file: str | None = None) -> None:
    """Rename the staged files into place (renames only: the window a kill could hit is a few system calls)
    and remove the index of the other kind (a bm25 folder after a dense build, or the reverse)."""
    for name, tmp in staged.items():
        final = folder / name
        if tmp.is_dir() and final.is_dir():
            old = folder / f".{name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    for name in (BM25_INDEX_DIR, DENSE_INDEX_FILE, SHARDED_INDEX_DIR):  # the index of another kind, now stale
        other = folder / name
        if name == (index_file or (BM25_INDEX_DIR if sparse else DENSE_INDEX_FILE)):
            continue
        if other.is_dir():
            shutil.rmtree(other)
        elif other.exists():
            other.unlink()
