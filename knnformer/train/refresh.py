"""An index that follows the model: re-embed every chunk with the learned retriever, rebuild the index and the
neighbours, and hand them to the trainer.

The schedule is data (Atlas): ``"0-1000:250,1000-:1000"`` refreshes every 250 steps from step 0 until step 1000,
then every 1000. A refresh at step s runs before optimizer step s (0-based) and serves it and the steps after.

What a refresh writes, all inside the run (several runs may share one datastore, so a run's refreshed
neighbours are its own): ``RUN/refresh/refresh-NNNN/`` with ``neighbours.npy`` and ``neighbour_scores.npy``
(as ``knnformer index`` writes them), ``embeddings.f16.npy`` (the retriever's vectors of every chunk, for
``past`` and for inspection) and ``manifest.json`` (the neighbours entry of a datastore manifest plus the refresh
id, its step, the index's recall and its timings). The folder is written under a temporary name and renamed into
place; the run record (``config.json`` beside the weights of every later checkpoint) then names it, so a resumed
run and ``evaluate`` read the same neighbours. Refresh 0 is the datastore's own neighbours (the frozen embedder).

Where it runs (``retrieval.refresh.lag``). With a lag of L > 0 steps, a refresh due before step s embeds from a
copy of the weights at s on a background thread (``BackgroundRefresh``; torch, faiss and numpy release the GIL in
their kernels, so it runs on a second core) while training goes on with the previous neighbours; before step
s + L the trainer takes its result, waiting only if it is not done, and swaps it in. The swap step is fixed, so
the neighbours of every step are a function of the weights alone, never of timing. A checkpoint taken while a
refresh is in flight first waits for it and records it as pending (``record["refresh_pending"]``), so a resumed
run swaps in the same folder at the same step. With L = 0 training waits for every refresh. Either way the
pause is logged (``refresh_seconds``) and the refresh's own CPU time beside it (``refresh_cpu_seconds``). A
refresh's result depends only on the weights (eval mode, deterministic search), so a resumed run that redoes a
refresh gets the same neighbours.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np

from knnformer.config import RetrievalConfig, Schedule
from knnformer.data.chunks import ChunkLayout
from knnformer.data.datastore import Datastore
from knnformer.io import writing_folder
from knnformer.retrieval.hops import HOP2_FILE, HOP2_SCORES_FILE
from knnformer.retrieval.index import choose_index_kind
from knnformer.retrieval.neighbours import NEIGHBOURS_FILE, SCORES_FILE, Neighbours, Progress, _no_progress
from knnformer.retrieval.search import DenseNeighbours, dense_neighbours
from knnformer.run.refreshes import VECTORS_FILE, load_refresh, refresh_folder
from knnformer.run.vectors import embed_all_chunks, project_vectors

logger = logging.getLogger(__name__)


def refresh_due(step: int, schedule: Schedule) -> bool:
    """Whether a refresh runs before optimizer step ``step``: ``step`` lies in a range and is a multiple of its
    interval counted from the range's start."""
    return any(lo <= step and (hi is None or step < hi) and (step - lo) % every == 0 for lo, hi, every in schedule)


def refresh_neighbours(model, base: Neighbours, run_dir: str | Path, refresh_id: int, step: int,
                       index: str = "auto", recall_floor: float = 0.0, seed: int = 0,
                       progress: Progress = _no_progress, hops: int = 1, ef_search: int = 0,
                       frozen: np.ndarray | None = None, mode: str = "reindex",
                       candidates: Neighbours | None = None) -> Neighbours:
    """Embed every chunk of ``base``'s datastore with ``model``'s learned retriever, index the train chunks, compute
    every chunk's neighbours under ``base``'s leakage rules (its ``exclude_window`` and document rule) and write
    refresh ``refresh_id`` of the run; returns the new neighbours (as many per chunk as ``base`` holds). With
    ``hops=2`` the second hop's too (its query: the retriever's embedding of the chunk's tokens joined with its
    first neighbour's, see hops.py), and those are returned. A retriever reading the frozen embedder projects
    ``frozen`` (the datastore's vectors of every chunk) instead of embedding tokens."""
    store, layout = base.store, base.layout
    t0 = time.perf_counter()
    if model.retrieval.retriever.reads_embedder:  # project the frozen embedder's stored vectors
        if frozen is None:
            raise ValueError("this learned retriever reads the frozen embedder's vectors: pass them (frozen=)")
        vectors = project_vectors(model, frozen, progress=progress("projecting", layout.num_chunks))
    else:
        vectors = embed_all_chunks(model, store.tokens, layout.starts, layout.ends,
                                   progress=progress("embedding", layout.num_chunks))
    embed_s = time.perf_counter() - t0
    if mode == "rerank":
        dense = rerank_neighbours(layout, vectors, candidates or base, base.info["exclude_window"],
                                  base.info["exclude_same_document"], seed)
    else:
        kind = choose_index_kind(layout.num_train, vectors.shape[1]) if index == "auto" else index
        dense = dense_neighbours(layout, vectors, base.k, base.info["exclude_window"],
                                 base.info["exclude_same_document"], kind, seed, progress, recall_floor, ef_search)
    hop2 = learned_second_hop(model, base, dense, vectors) if hops == 2 else None
    info = {**{key: base.info[key] for key in ("tokenizer_fingerprint", "chunk_size", "exclude_window",
                                               "exclude_same_document")},
            "embedder": "learned", "embedder_fingerprint": f"learned:refresh-{refresh_id}",
            "file": NEIGHBOURS_FILE, "scores_file": SCORES_FILE, "k": base.k, "num_chunks": layout.num_chunks,
            "index_kind": dense.kind, "refresh_mode": mode,
            "ef_search": dense.index.ef_search if dense.kind == "hnsw" else None,
            "num_short_rows": dense.num_short, "refresh": refresh_id, "step": step,
            "recall_at_10": round(dense.recall, 4), "recall_queries": dense.recall_queries,
            "recall_floor": recall_floor, "embed_seconds": round(embed_s, 3),
            "index_seconds": round(dense.build_seconds, 3), "neighbours_seconds": round(dense.neighbours_seconds, 3),
            "hops": hops}
    final = refresh_folder(run_dir, refresh_id)
    # a resumed run redoing a refresh replaces the folder: the same weights wrote the same neighbours
    with writing_folder(final) as tmp:
        np.save(tmp / NEIGHBOURS_FILE, dense.ids)
        np.save(tmp / SCORES_FILE, dense.scores)
        np.save(tmp / VECTORS_FILE, vectors.astype(np.float16))
        if hop2 is not None:
            np.save(tmp / HOP2_FILE, hop2[0])
            np.save(tmp / HOP2_SCORES_FILE, hop2[1])
        (tmp / "manifest.json").write_text(json.dumps(info, indent=2))
    logger.info("refresh %d at step %d: %.2f s (embedding %.2f s), recall@10 %.3f", refresh_id, step,
                time.perf_counter() - t0, embed_s, dense.recall)
    return load_refresh(final, store, layout, hops)


def learned_second_hop(model, base: Neighbours, dense: DenseNeighbours, vectors: np.ndarray):
    """The second hop's neighbours and scores under ``base``'s leakage rules: each chunk's query is ``model``'s
    retriever embedding of the chunk's tokens joined with those of its first neighbour in ``dense`` (see
    hops.py), searched in ``dense``'s index of the train chunks' ``vectors``."""
    from knnformer.retrieval.hops import second_hop, second_hop_tokens
    from knnformer.retrieval.index import exact_search_excluding
    from knnformer.run.vectors import embed_token_rows

    layout = base.layout
    if 2 * layout.chunk_size > model.config.context:
        raise ValueError(f"retrieval.search.hops=2 with a learned retriever embeds two chunks ({2 * layout.chunk_size} "
                         f"tokens) at once, more than the context {model.config.context}; use hops=1")
    q = np.arange(layout.num_chunks)
    joined = embed_token_rows(model, *second_hop_tokens(base.store, layout, q, np.asarray(dense.ids)[:, 0]))
    xb = vectors[: layout.num_train]
    return second_hop(layout, dense.ids, dense.scores, lambda ids, kk: dense.index.search(joined[ids], kk),
                      base.k, base.info["exclude_window"], base.info["exclude_same_document"],
                      lambda ids, lo, hi, kk: exact_search_excluding(xb, joined[ids], kk, lo, hi))


def rerank_neighbours(layout: ChunkLayout, vectors: np.ndarray, candidates: Neighbours, exclude_window: int,
                      exclude_same_document: bool, seed: int = 0, num_queries: int = 200) -> DenseNeighbours:
    """Every chunk's ``candidates`` (the datastore's neighbours: leakage-safe already) re-ordered by the inner
    product of ``vectors``; recall = share of the exact top 10 under ``vectors`` (same leakage rules) that the
    candidate lists hold, on ``num_queries`` random chunks."""
    from knnformer.retrieval.index import exact_search_excluding
    from knnformer.retrieval.search import excluded_ranges

    t0 = time.perf_counter()
    cand = np.asarray(candidates.ids, dtype=np.int64)
    ids = np.empty(cand.shape, dtype=np.int32)
    scores = np.empty(cand.shape, dtype=np.float16)
    for b in range(0, len(cand), 65_536):
        c = cand[b : b + 65_536]
        q = np.asarray(vectors[b : b + len(c)], dtype=np.float32)
        keys = np.asarray(vectors[np.maximum(c, 0).reshape(-1)], dtype=np.float32).reshape(*c.shape, -1)
        s = np.where(c >= 0, np.einsum("nd,nkd->nk", q, keys), -np.inf)
        order = np.argsort(-s, axis=1, kind="stable")
        ids[b : b + len(c)] = np.take_along_axis(c, order, 1)
        ordered = np.take_along_axis(s, order, 1)
        scores[b : b + len(c)] = np.where(np.isfinite(ordered), ordered, 0)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(layout.num_chunks, size=min(num_queries, layout.num_chunks), replace=False))
    lo, hi = excluded_ranges(layout, sample, exclude_window, exclude_same_document)
    exact = exact_search_excluding(vectors[: layout.num_train], np.asarray(vectors[sample], np.float32), 10, lo, hi).I
    hits = sum(len(np.intersect1d(e[e >= 0], cand[q][cand[q] >= 0])) for q, e in zip(sample, exact))
    recall = hits / max(1, int((exact >= 0).sum()))
    return DenseNeighbours(None, "rerank", ids, scores, int((ids < 0).any(1).sum()), float(recall), len(sample),
                           0.0, time.perf_counter() - t0)


class BackgroundRefresh:
    """One refresh computed on a background thread from a copy of ``model`` (weights at the start; hooks, grads
    and optimizer state are not copied), to be swapped in before step ``swap_step``. ``result()`` waits for it
    and re-raises what the thread raised."""

    def __init__(self, model, retrieval: RetrievalConfig, base: Neighbours, run_dir: str | Path, refresh_id: int,
                 step: int, swap_step: int, **kwargs):
        from knnformer.model.transformer import Transformer

        retriever = model.retrieval.retriever
        input_dim = retriever.proj.weight.shape[1] if retriever.reads_embedder else 0
        snapshot = Transformer(model.config, retrieval, input_dim).to(next(model.parameters()).device)
        snapshot.load_state_dict(model.state_dict())
        snapshot.eval()
        self.refresh_id, self.step, self.swap_step = refresh_id, step, swap_step
        self.cpu_seconds = 0.0
        self._out: Neighbours | None = None
        self._error: BaseException | None = None

        def work() -> None:
            t0 = time.thread_time()
            try:
                self._out = refresh_neighbours(snapshot, base, run_dir, refresh_id, step, **kwargs)
            except BaseException as e:  # handed to the training thread by result()
                self._error = e
            finally:
                self.cpu_seconds = time.thread_time() - t0

        self._thread = threading.Thread(target=work, name=f"knnformer-refresh-{refresh_id}", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Neighbours:
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"refresh {self.refresh_id} (started before step {self.step}) failed: "
                               f"{self._error}") from self._error
        return self._out


class FinishedRefresh:
    """A pending refresh a resumed run finds already written (the checkpoint waited for it): its folder, swapped
    in at ``swap_step`` as the original run would have."""

    cpu_seconds = 0.0

    def __init__(self, folder: Path, store: Datastore, layout: ChunkLayout, hops: int, refresh_id: int, step: int,
                 swap_step: int):
        self.folder, self.store, self.layout, self.hops = folder, store, layout, hops
        self.refresh_id, self.step, self.swap_step = refresh_id, step, swap_step

    def done(self) -> bool:
        return True

    def result(self) -> Neighbours:
        return load_refresh(self.folder, self.store, self.layout, self.hops)
