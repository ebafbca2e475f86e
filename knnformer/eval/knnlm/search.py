"""kNN-LM's search: the nearest keys of a ``KnnStore`` to each query by squared L2 distance, exactly or through an
approximate faiss index kept beside the keys (``index-<kind>.faiss``, built the first time a search needs it).

The faiss plumbing is retrieval's (``knnformer.retrieval.index``: the import, thread control, exact search and
re-scoring with ``metric="l2"``, the IVF sizes with kNN-LM's own ratios); this module adds what differs for
keys: distances, not inner products, an IVF over the fp16 keys themselves, and the choice between them by the
work a search costs.
"""

from __future__ import annotations

import json
import time

import numpy as np

from knnformer.eval.knnlm.store import KnnStore, Progress, ProgressFactory
from knnformer.io import atomic_write_text, writing_file
from knnformer.retrieval.index import _faiss, _nlist, _pq_m, exact_search, faiss_threads, rescore

INDEX_KINDS = ("auto", "exact", "ivf", "ivfpq")
INDEX_VERSION = 2
"""Bumped when ``build_ivf`` changes what it builds: an index of another version is rebuilt."""
EXACT_MAX_WORK = 5e10
"""Largest queries x keys x width for which ``auto`` searches exactly (about 10 s on this shared CPU)."""
DEFAULT_MEMORY_BUDGET = 2 << 30
NEEDS_FAISS = "kNN-LM search"


def choose_index_kind(num_keys: int, dim: int, num_queries: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """``auto``: exact search while queries x keys x width stays under ``EXACT_MAX_WORK``; else IVF over the
    fp16 keys while they fit ``memory_budget``; else IVF-PQ, re-scored from the memory-mapped fp16 keys."""
    if num_queries * num_keys * dim <= EXACT_MAX_WORK:
        return "exact"
    if num_keys * dim * 2 <= memory_budget:
        return "ivf"
    return "ivfpq"


def exact_l2(xb: np.ndarray, xq: np.ndarray, k: int, block: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 top ``k`` of ``xq`` over the rows of ``xb`` (any float array, e.g. the fp16 memory map),
    ``block`` rows converted to fp32 at a time."""
    _faiss(NEEDS_FAISS)
    return exact_search(xb, xq, k, block, metric="l2")


class KeySearch:
    """Nearest keys of a ``KnnStore`` by squared L2 distance, in faiss's names: ``search(xq, k) -> (D, I)``,
    nearest first, ``D`` exact squared distances and ``I`` key ids (-1 where fewer than k were found).

    - ``exact``: brute force over the memory-mapped keys, ``block`` keys converted to fp32 at a time.
    - ``ivf``: ``IndexIVFScalarQuantizer`` with fp16 codes, i.e. the fp16 keys themselves (2 D bytes a key in
      memory): its distances are exact for the stored keys; ``nprobe`` of its lists searched a query.
    - ``ivfpq``: ``IndexIVFPQ`` (D / 4 bytes a key) whose ``refine`` x k candidates are re-scored from the fp16
      keys, read from the memory map a query batch at a time.
    """

    def __init__(self, store: KnnStore, kind: str, index=None, nprobe: int = 8, refine: int = 8):
        self.store, self.kind, self.index, self.nprobe, self.refine = store, kind, index, nprobe, refine

    def search(self, xq: np.ndarray, k: int, batch_size: int = 8192,
               progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss(NEEDS_FAISS)
        k = int(min(k, self.store.num_keys))
        D = np.empty((len(xq), k), dtype=np.float32)
        I = np.empty((len(xq), k), dtype=np.int64)  # noqa: E741 - faiss's name
        if self.index is not None:
            faiss.extract_index_ivf(self.index).nprobe = self.nprobe
        kk = min(self.store.num_keys, self.refine * k)
        if self.kind == "ivfpq":  # bound the re-scored candidates' vectors (queries x kk x D fp32) to 256 MB
            batch_size = max(1, min(batch_size, (1 << 26) // (kk * self.store.dim)))
        for b in range(0, len(xq), batch_size):
            q = np.ascontiguousarray(xq[b : b + batch_size], dtype=np.float32)
            if self.kind == "exact":
                d, i = exact_l2(self.store.keys, q, k)
            else:
                scanned = min(1.0, self.nprobe / self.index.nlist) * self.store.num_keys
                with faiss_threads(int(len(q) * scanned * self.store.dim)):
                    if self.kind == "ivf":
                        d, i = self.index.search(q, k)
                    else:
                        cand = self.index.search(q, kk)[1]
                if self.kind == "ivfpq":
                    d, i = rescore(self.store.keys, q, cand, k, metric="l2")
            D[b : b + len(q)], I[b : b + len(q)] = d, np.where(np.isfinite(d) & (d < 1e37), i, -1)
            if progress is not None:
                progress(len(q))
        return D, I


def build_ivf(store: KnnStore, kind: str, seed: int = 0, progress: Progress | None = None):
    """A trained and filled ``ivf`` or ``ivfpq`` index over ``store``'s keys, trained on a random sample.
    (Retrieval's ``build_dense_index`` builds inner-product indexes over chunk vectors, with other sizes.)"""
    faiss = _faiss(NEEDS_FAISS)
    n, d = store.num_keys, store.dim
    nlist = _nlist(n, per_root=2, min_points=40)
    quantizer = faiss.IndexFlatL2(d)
    if kind == "ivf":  # fp16 codes of the keys themselves (not of residuals): exact, half IndexIVFFlat's memory
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2,
                                              False)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, nlist, _pq_m(d, dims_per_byte=4), 8 if n >= 256 * 39 else 4,
                                 faiss.METRIC_L2)
        index.pq.cp.seed = seed
    index.cp.seed, index.cp.niter = seed, 10
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 40 * nlist), replace=False))
    with faiss_threads(len(sample) * d * nlist * 10):
        index.train(np.asarray(store.keys[sample], dtype=np.float32))
    for b in range(0, n, 131_072):
        with faiss_threads(n * d * nlist):
            index.add(np.asarray(store.keys[b : b + 131_072], dtype=np.float32))
        if progress is not None:
            progress(min(131_072, n - b))
    return index


def open_key_search(store: KnnStore, kind: str, nprobe: int = 8, seed: int = 0,
                    progress_factory: ProgressFactory | None = None) -> tuple[KeySearch, dict]:
    """A ``KeySearch`` of ``kind`` over ``store``; an approximate index is loaded from ``index-<kind>.faiss``
    or built and saved there (atomically, recorded in the manifest). Returns it and a note on how it was had."""
    if kind == "exact":
        return KeySearch(store, kind), {"kind": kind}
    if kind not in ("ivf", "ivfpq"):
        raise ValueError(f"unknown kNN-LM index {kind!r}; pick one of {', '.join(INDEX_KINDS)}")
    faiss = _faiss(NEEDS_FAISS)
    path = store.path / f"index-{kind}.faiss"
    entry = store.manifest.get("indexes", {}).get(kind)
    if entry is not None and entry.get("version") == INDEX_VERSION and path.is_file():
        index = faiss.read_index(str(path))
        return KeySearch(store, kind, index, nprobe), {**entry, "reused": True}
    t0 = time.perf_counter()
    progress = progress_factory(store.num_keys, f"kNN-LM {kind} index") if progress_factory else None
    index = build_ivf(store, kind, seed, progress)
    with writing_file(path) as tmp:
        faiss.write_index(index, str(tmp))
    entry = {"kind": kind, "version": INDEX_VERSION, "file": path.name, "nlist": int(index.nlist),
             "bytes": path.stat().st_size,
             "build_seconds": round(time.perf_counter() - t0, 3)}
    store.manifest.setdefault("indexes", {})[kind] = entry
    atomic_write_text(store.path / "manifest.json", json.dumps(store.manifest, indent=2))
    return KeySearch(store, kind, index, nprobe), {**entry, "reused": False}


def recall(search: KeySearch, xq: np.ndarray, k: int, num_queries: int = 100, seed: int = 0) -> float:
    """Share of the exact top ``k`` that ``search`` finds, on a random sample of the queries ``xq``."""
    if search.kind == "exact":
        return 1.0
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(xq), size=min(num_queries, len(xq)), replace=False))
    q = np.ascontiguousarray(xq[sample], dtype=np.float32)
    exact = exact_l2(search.store.keys, q, k)[1]
    approx = search.search(q, k)[1]
    hits = sum(len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approx, exact))
    return hits / exact.size
