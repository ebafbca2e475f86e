"""Indexes over the train chunks: faiss for dense embeddings, bm25s for lexical retrieval.

Both expose the same small interface, faiss's names: ``search(xq, k) -> SearchResult(D, I)`` with scores ``D``
(higher is nearer) and train chunk ids ``I`` (-1 where fewer than k were found), ``save(path)`` (atomic) and
``load(path, mmap=True)``. A dense index takes ``xq`` as a (n, d) float array; ``BM25Index`` takes a list of texts.

Dense kinds (inner product on unit vectors, i.e. cosine):

- ``flat``: exact search (``IndexFlatIP``), d*4 bytes a chunk. Loaded with the codes memory-mapped.
- ``hnsw``: a graph (``IndexHNSWFlat``, M=32), fast and near-exact, d*4 + ~M*8 bytes a chunk. Its build is
  multi-threaded, so two builds may differ in a few neighbours.
- ``ivfpq``: coarse clusters + product quantisation trained on a sample, ~d/8 bytes a chunk; lossy, so its
  candidates are re-scored with the stored fp16 vectors (``embeddings.f16``, memory-mapped).

``choose_index_kind`` (``auto``) takes ``flat`` while exact search of every chunk against every train chunk stays
cheap (``FLAT_MAX`` train chunks), else ``hnsw`` while its memory fits the budget, else ``ivfpq``.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from knnformer.io import writing_file, writing_folder

logger = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "hnsw", "ivfpq")
FLAT_MAX = 50_000
"""Largest number of train chunks for which ``auto`` picks exact search."""
DEFAULT_MEMORY_BUDGET = 2 << 30
HNSW_M = 32
EF_SEARCH = 256
REFINE_FACTOR = 16
"""An ivfpq search re-scores up to this many times k candidates (for k <= 64) with the stored vectors."""
SMALL_WORK = 1 << 26
ADD_BATCH = 65_536


class SearchResult(NamedTuple):
    D: np.ndarray
    """(nq, k) float32 scores, higher is nearer (with ``metric="l2"``: squared distances, lower is nearer)."""
    I: np.ndarray  # noqa: E741 - faiss's name
    """(nq, k) int64 train chunk ids, -1 where none."""


def _faiss(needed_by: str = "the dense index"):
    """The faiss module, or a ValueError saying that ``needed_by`` needs it."""
    try:
        import faiss
    except ImportError:
        raise ValueError(f"{needed_by} needs faiss: `pip install faiss-cpu`") from None
    return faiss


@contextmanager
def faiss_threads(work: int) -> Iterator[None]:
    """Run a faiss job of about ``work`` multiply-adds on one thread when it is small: on a busy machine OpenMP's
    start-up and spinning cost more than such a job (measured here: 7 s on two threads vs 0.04 s on one to
    train a 3,000-point IVF-PQ). Restores faiss's thread count afterwards."""
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    if work < SMALL_WORK:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def index_bytes(kind: str, n: int, d: int) -> int:
    """Estimated memory of an index of ``n`` vectors of dimension ``d``."""
    if kind == "flat":
        return n * d * 4
    if kind == "hnsw":
        return n * (d * 4 + HNSW_M * 2 * 4 + 16)
    if kind == "ivfpq":
        return n * (_pq_m(d) + 8) + d * 4 * _nlist(n)
    raise ValueError(f"unknown index kind {kind!r}; pick one of {', '.join(INDEX_KINDS)}")


def choose_index_kind(n: int, d: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """``auto``: exact for small stores, HNSW when it fits ``memory_budget`` bytes, IVF-PQ otherwise."""
    if n <= FLAT_MAX and index_bytes("flat", n, d) <= memory_budget:
        return "flat"
    if index_bytes("hnsw", n, d) <= memory_budget:
        return "hnsw"
    return "ivfpq"


def _nlist(n: int, per_root: int = 4, min_points: int = 39) -> int:
    """Inverted lists: about ``per_root`` sqrt(n), with at least ``min_points`` training points each (faiss's
    k-means minimum is 39). kNN-LM's key index takes 2 and 40."""
    return int(max(1, min(65_536, per_root * int(np.sqrt(n)), n // min_points)))


def _pq_m(d: int, dims_per_byte: int = 8) -> int:
    """Sub-quantizers: about one byte per ``dims_per_byte`` dimensions, a divisor of d (kNN-LM's keys take 4)."""
    target = max(1, d // dims_per_byte)
    return max(m for m in range(1, target + 1) if d % m == 0)


class DenseIndex:
    """A faiss index over the train chunks' unit vectors; ``kind`` is flat, hnsw or ivfpq.

    ``refine``: the train vectors themselves (the memory-mapped ``embeddings.f16`` rows), with which an ivfpq
    search re-scores ``REFINE_FACTOR`` times k candidates exactly: the compressed codes pick candidates, the
    stored vectors order them. Only the candidates' rows are read from disk."""

    def __init__(self, index, kind: str, refine: np.ndarray | None = None, ef_search: int = 0):
        self.index, self.kind, self.refine = index, kind, refine
        self.ef_search = ef_search or EF_SEARCH
        """HNSW's search breadth (at least k): recall against time. For the sympy learned retriever's vectors
        (125k x 128): 256 -> recall@10 0.989, 12.1 s per 20k queries of 64; 64 -> 0.969, 3.4 s."""

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, xq: np.ndarray, k: int, batch_size: int = 4096) -> SearchResult:
        """The ``k`` nearest train chunks of each row of ``xq``, searched ``batch_size`` rows at a time."""
        xq = np.asarray(xq)
        k = int(min(k, self.ntotal))
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        D = np.empty((len(xq), k), dtype=np.float32)
        I = np.empty((len(xq), k), dtype=np.int64)  # noqa: E741
        refine = self.refine is not None and self.kind == "ivfpq"
        kk = min(k + (REFINE_FACTOR - 1) * min(k, 64), self.ntotal) if refine else k
        # bound one call's result (and re-scoring) arrays to about 64 MB however large k is
        batch_size = max(1, min(batch_size, (1 << 24) // (kk * (xq.shape[1] if refine else 4))))
        for b in range(0, len(xq), batch_size):
            q = np.ascontiguousarray(xq[b : b + batch_size], dtype=np.float32)
            with faiss_threads(len(q) * self.ntotal * q.shape[1] if self.kind == "flat" else len(q) * kk * 64):
                d, i = self.index.search(q, kk)
            if refine:
                d, i = self._rescore(q, i, k)
            D[b : b + len(q)], I[b : b + len(q)] = d, i
        return SearchResult(D, I)

    def _rescore(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the candidates ``cand`` (nq, kk) from the stored vectors; the top ``k``, nearest first."""
        return rescore(self.refine, q, cand, k)

    def save(self, path: str | Path) -> None:
        """Write the index to ``path`` through a temporary file."""
        with writing_file(path) as tmp:
            try:
                _faiss().write_index(self.index, str(tmp))
            except RuntimeError as e:  # faiss reports a failed write (a full disk) as a RuntimeError
                if "write error" not in str(e):
                    raise
                why = str(e).rsplit("(", 1)[-1].rstrip(")\n ") if "(" in str(e) else "write error"
                raise OSError(errno.ENOSPC, why, str(path)) from None

    @classmethod
    def load(cls, path: str | Path, kind: str, mmap: bool = True, refine: np.ndarray | None = None) -> "DenseIndex":
        """Read an index; with ``mmap`` the vectors (flat, hnsw) or inverted lists (ivfpq) stay on disk,
        paged in by the OS as searches touch them, so loading costs no memory up front."""
        faiss = _faiss()
        if not Path(path).is_file():
            raise ValueError(f"no index at {path}; build it with `knnformer index`")
        flags = [faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY] if mmap else []
        for flag in flags:
            try:
                return cls(faiss.read_index(str(path), flag), kind, refine)
            except RuntimeError:  # this index type cannot be memory-mapped
                continue
        try:
            return cls(faiss.read_index(str(path)), kind, refine)
        except RuntimeError as e:  # truncated or not a faiss index
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            why = lines[-1].strip()[:160] if lines else "unreadable"
            raise ValueError(f"{path} is truncated or corrupt ({why}); rebuild it with `knnformer index`") from None


def build_dense_index(xb: np.ndarray, kind: str, seed: int = 0, progress: Callable[[int], None] | None = None,
                      refine: bool = True) -> DenseIndex:
    """Build a ``kind`` index over the rows of ``xb`` (any float array, e.g. the fp16 memory map), adding them
    ``ADD_BATCH`` at a time so only one batch is converted to float32 at once. IVF-PQ trains on a random sample
    and, with ``refine``, re-scores its candidates with ``xb`` (see ``DenseIndex``)."""
    faiss = _faiss()
    n, d = xb.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    elif kind == "ivfpq":
        nlist, m = _nlist(n), _pq_m(d)
        nbits = 8 if n >= 256 * 39 else 4
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.pq.cp.seed = seed
        index.nprobe = min(nlist, 32)
        sample_size = min(n, 100_000, max(50 * nlist, 64 * (1 << nbits)))
        sample = np.sort(np.random.default_rng(seed).choice(n, size=sample_size, replace=False))
        with faiss_threads(sample_size * d * nlist):
            index.train(np.ascontiguousarray(xb[sample], dtype=np.float32))
    else:
        raise ValueError(f"unknown --index {kind!r}; pick one of {', '.join(INDEX_KINDS)}")
    for b in range(0, n, ADD_BATCH):
        with faiss_threads(n * d * 64):
            index.add(np.ascontiguousarray(xb[b : b + ADD_BATCH], dtype=np.float32))
        if progress is not None:
            progress(min(ADD_BATCH, n - b))
    return DenseIndex(index, kind, xb if refine and kind == "ivfpq" else None)


def exact_search(xb: np.ndarray, xq: np.ndarray, k: int, block: int = 262_144, metric: str = "ip") -> SearchResult:
    """Exact top ``k`` of ``xq`` over ``xb``, ``block`` rows of ``xb`` at a time (memory-mapped ``xb`` is never
    loaded whole). ``metric``: ``ip`` (inner product, highest first) or ``l2`` (squared L2 distance, lowest first:
    kNN-LM's keys)."""
    faiss = _faiss()
    l2 = _l2(metric)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    k = min(k, len(xb))
    heap = faiss.ResultHeap(len(xq), k, keep_max=not l2)
    for b in range(0, len(xb), block):
        with faiss_threads(len(xq) * min(block, len(xb)) * xq.shape[1]):
            D, I = faiss.knn(xq, np.ascontiguousarray(xb[b : b + block], dtype=np.float32), k,
                             metric=faiss.METRIC_L2 if l2 else faiss.METRIC_INNER_PRODUCT)
        heap.add_result(D, np.where(I >= 0, I + b, -1))
    heap.finalize()
    return SearchResult(heap.D, heap.I)


def rescore(xb: np.ndarray, xq: np.ndarray, cand: np.ndarray, k: int, metric: str = "ip") -> SearchResult:
    """Exact scores of the candidates ``cand`` (nq, kk) of the float32 queries ``xq`` from the rows of ``xb`` (e.g.
    the fp16 memory map; only the candidates' rows are read, in order); the top ``k``, nearest first. ``metric``
    as ``exact_search``: an absent candidate (-1) scores -inf (``ip``) or inf (``l2``)."""
    rows, inverse = np.unique(np.maximum(cand.reshape(-1), 0), return_inverse=True)  # sorted reads
    vecs = np.asarray(xb[rows], dtype=np.float32)[inverse].reshape(*cand.shape, -1)  # (nq, kk, d)
    if _l2(metric):
        d = np.where(cand >= 0, ((vecs - xq[:, None, :]) ** 2).sum(-1), np.inf).astype(np.float32)
        top = np.argsort(d, axis=1, kind="stable")[:, :k]
        return SearchResult(np.take_along_axis(d, top, 1), np.take_along_axis(cand, top, 1))
    scores = np.where(cand >= 0, np.einsum("qd,qkd->qk", xq, vecs), -np.inf).astype(np.float32)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    d, i = np.take_along_axis(scores, top, 1), np.take_along_axis(cand, top, 1)
    return SearchResult(np.where(i >= 0, d, -np.inf).astype(np.float32), i)


def _l2(metric: str) -> bool:
    if metric not in ("ip", "l2"):
        raise ValueError(f"unknown metric {metric!r}; pick ip or l2")
    return metric == "l2"


def exact_search_excluding(xb: np.ndarray, xq: np.ndarray, k: int, lo: np.ndarray, hi: np.ndarray,
                           block: int = 65_536, rows: int = 256) -> SearchResult:
    """Exact inner-product top ``k`` of each query ``xq[r]`` over the rows of ``xb`` outside ``[lo[r], hi[r])``;
    ``rows`` queries and ``block`` rows of ``xb`` at a time (about 64 MB of scores)."""
    nq, n = len(xq), len(xb)
    k = min(k, n)
    D = np.full((nq, k), -np.inf, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)  # noqa: E741
    for r in range(0, nq, rows):
        q = np.asarray(xq[r : r + rows], dtype=np.float32)
        rlo, rhi = np.asarray(lo[r : r + rows])[:, None], np.asarray(hi[r : r + rows])[:, None]
        best_d, best_i = D[r : r + rows], I[r : r + rows]
        for b in range(0, n, block):
            ids = np.arange(b, min(b + block, n))
            scores = q @ np.asarray(xb[b : b + block], dtype=np.float32).T
            scores[(ids >= rlo) & (ids < rhi)] = -np.inf
            cand_d = np.concatenate([best_d, scores], 1)
            cand_i = np.concatenate([best_i, np.broadcast_to(ids, scores.shape)], 1)
            if cand_d.shape[1] > k:  # the k best of each row, unordered, in linear time; then order those k
                part = np.argpartition(-cand_d, k - 1, axis=1)[:, :k]
                cand_d, cand_i = np.take_along_axis(cand_d, part, 1), np.take_along_axis(cand_i, part, 1)
            top = np.argsort(-cand_d, axis=1, kind="stable")
            best_d, best_i = np.take_along_axis(cand_d, top, 1), np.take_along_axis(cand_i, top, 1)
        best_i[~np.isfinite(best_d)] = -1
        D[r : r + rows], I[r : r + rows] = best_d, best_i
    return SearchResult(D, I)


def recall_at_k(index: DenseIndex, xb: np.ndarray, xq: np.ndarray, k: int = 10) -> float:
    """Share of the exact top ``k`` (over ``xb``) that ``index`` returns for the queries ``xq``."""
    k = min(k, len(xb))
    exact = exact_search(xb, xq, k).I
    approx = index.search(xq, k).I
    hits = sum(len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approx, exact))
    return hits / (k * len(xq))


def measure_recall(index: DenseIndex, xb: np.ndarray, xq_all: np.ndarray, num_queries: int = 1000, k: int = 10,
                   seed: int = 0) -> tuple[float, int]:
    """recall@k of ``index`` against exact search on a random sample of ``num_queries`` rows of ``xq_all``."""
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(xq_all), size=min(num_queries, len(xq_all)), replace=False))
    return recall_at_k(index, xb, np.asarray(xq_all[sample], dtype=np.float32), k), len(sample)


# ---------------------------------------------------------------- BM25

def _bm25s():
    try:
        import bm25s
    except ImportError:
        raise ValueError("the bm25 embedder needs the package bm25s: `pip install bm25s`") from None
    # bm25s sets its logger to DEBUG on import and logs every empty query at INFO; keep its warnings only
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def _bm25_backend(num_queries: int) -> str:
    """bm25s scores with numba when it is installed (5x faster here: 0.18 s vs 0.9 s per 1,000 queries over
    117k chunks) but compiles for ~3 s first, so small batches (live retrieval) stay on numpy. The two
    give the same scores; only the order of exact ties may differ."""
    if num_queries < 1000:
        return "numpy"
    try:
        import numba  # noqa: F401
    except ImportError:
        return "numpy"
    return "numba"


class BM25Index:
    """A bm25s index over the train chunk texts (Lucene BM25, English stopwords); exact, so recall is 1."""

    kind = "bm25"
    backend: str | None = None
    """bm25s's backend for every search ("numpy" or "numba"); None picks by batch size (``_bm25_backend``). A
    long-lived process (the server) sets "numba": after its one compile a query costs ~0.4 ms, where numpy's
    top-k (argpartition over mostly-zero scores) takes ~4 ms (measured on the 62k chunks of tiny shakespeare)."""

    def __init__(self, retriever, ntotal: int):
        self.retriever, self._ntotal = retriever, ntotal

    @property
    def ntotal(self) -> int:
        return self._ntotal

    @classmethod
    def build(cls, texts: list[str]) -> "BM25Index":
        bm25s = _bm25s()
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        return cls(retriever, len(texts))

    def search(self, xq: list[str], k: int, batch_size: int = 4096) -> SearchResult:
        bm25s = _bm25s()
        k = int(min(k, self.ntotal))
        D = np.empty((len(xq), k), dtype=np.float32)
        I = np.empty((len(xq), k), dtype=np.int64)  # noqa: E741
        for b in range(0, len(xq), batch_size):
            q = bm25s.tokenize(list(xq[b : b + batch_size]), stopwords="en", return_ids=False, show_progress=False)
            backend = self.backend or _bm25_backend(len(q))
            res = self.retriever.retrieve(q, k=k, show_progress=False, backend_selection=backend)
            I[b : b + len(q)], D[b : b + len(q)] = res.documents, res.scores
        return SearchResult(D, I)

    def save(self, path: str | Path) -> None:
        """Write the bm25s folder at ``path`` through a temporary folder."""
        with writing_folder(path) as tmp:
            self.retriever.save(str(tmp), show_progress=False)
            (tmp / "ntotal.txt").write_text(str(self.ntotal))

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> "BM25Index":
        path = Path(path)
        if not (path / "ntotal.txt").is_file():
            raise ValueError(f"no bm25 index at {path}; build it with `knnformer index --embedder bm25`")
        retriever = _bm25s().BM25.load(str(path), mmap=mmap, show_progress=False)
        return cls(retriever, int((path / "ntotal.txt").read_text()))


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
