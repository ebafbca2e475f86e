"""kNN-LM's search: the nearest keys of a ``KnnStore`` to each query by squared L2 distance, exactly or through an
approximate faiss index kept beside the keys (``index-<kind>.faiss``, built the first time a search needs it).

The faiss plumbing is retrieval's (``knnformer.retrieval.index``: the import, thread control, exact search and
re-scoring with ``metric="l2"``, the IVF sizes with kNN-LM's own ratios); this module adds what differs for
keys: distances, not inner products, an IVF over the fp16 keys themselves, the choice between them by the
work a search costs and the memory it needs, the choice of ``nprobe`` and ``refine`` by recall measured against
exact search (``choose_settings``), and a search that writes its results batch by batch to memory-mapped files
and resumes after a kill (``search_resumable``).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from knnformer.eval.knnlm.store import CHECKPOINT_SECONDS, KnnStore, Progress, ProgressFactory, read_manifest
from knnformer.io import atomic_write_text, writing_file, writing_folder
from knnformer.retrieval.index import _faiss, _nlist, _pq_m, faiss_threads

INDEX_KINDS = ("auto", "exact", "ivf", "ivfpq")
INDEX_VERSION = 4
"""Bumped when ``build_ivf`` changes what it builds: an index of another version is rebuilt.
3: the coarse quantizer of a large store is an HNSW graph over the centroids (assigning 10M keys to flat
centroids was most of the build). 4: a large store has 4x the lists, trained through that graph
(``ivf_lists``)."""
EXACT_MAX_WORK = 5e10
"""Largest queries x keys x width for which ``auto`` searches exactly (about 10 s on this shared CPU)."""
DEFAULT_MEMORY_BUDGET = 2 << 30
DEFAULT_RECALL = 0.99
"""recall@k against exact search that ``choose_settings`` asks of nprobe and refine. On the Gutenberg store
(1M keys, IVF, k 256) recall 0.976 kept 96.6% of the exact gain: 0.95 is not enough for "within 0.5%"."""
NPROBES = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
"""Lists a query may search, tried in order by ``choose_settings``: steps of 1.5x and 2x, because recall@256 on
3M keys went from 0.988 to 0.996 between nprobe 32 and 64, twice the time for a target of 0.99."""
REFINES = (1, 2, 4, 8, 16)
HNSW_QUANTIZER_MIN_LISTS = 2048
"""From this many inverted lists (at ``LISTS_PER_ROOT``) on, the coarse quantizer is an HNSW graph
(``IndexHNSWFlat``) over the centroids instead of a flat scan of them, and the store gets ``LARGE_LISTS_PER_ROOT``."""
LISTS_PER_ROOT, TRAINING_POINTS = 2, 40
"""IVF lists per sqrt(keys), and k-means training keys per list, of a store with a flat quantizer."""
LARGE_LISTS_PER_ROOT, LARGE_TRAINING_POINTS = 4, 16
"""The same for a store with a graph of centroids: more, shorter lists make a query scan fewer keys at the same
recall, and k-means assigns its training keys through the graph too, so twice the lists train in the same time.
Measured on 3M Gutenberg keys, recall@256 >= 0.99 (bench/knnlm_indexes.py, knnlm-indexes-3m.json): 0.59 ms a query
(nprobe 64) with 4 per root and 16 points a list, k-means 18.5 s; 0.86 ms with 2 and 40 points, 17.2 s; 8 and 16
points needed nprobe 128 (0.68 ms, 61 s)."""
NEEDS_FAISS = "kNN-LM search"


def ivf_lists(num_keys: int) -> tuple[int, int, bool]:
    """Inverted lists of a store's IVF, k-means training keys per list, and whether centroids are a graph."""
    nlist = _nlist(num_keys, per_root=LISTS_PER_ROOT, min_points=TRAINING_POINTS)
    if nlist < HNSW_QUANTIZER_MIN_LISTS:
        return nlist, TRAINING_POINTS, False
    nlist = _nlist(num_keys, per_root=LARGE_LISTS_PER_ROOT, min_points=LARGE_TRAINING_POINTS)
    return nlist, LARGE_TRAINING_POINTS, True


def index_bytes(kind: str, num_keys: int, dim: int) -> int:
    """Memory an index over ``num_keys`` keys holds while it is searched: codes, ids, centroids and, for IVF-PQ,
    faiss's precomputed distance tables (nlist x m x 256 floats, used when they are under faiss's 2 GiB cap)."""
    if kind == "exact":
        return 0
    nlist, _, graph = ivf_lists(num_keys)
    lists = nlist * dim * 4 + (nlist * (dim * 4 + 32 * 8) if graph else 0)
    if kind == "ivf":
        return num_keys * (dim * 2 + 8) + lists
    m = _pq_m(dim, dims_per_byte=4)
    tables = nlist * m * 256 * 4
    return num_keys * (m + 8) + lists + (tables if tables <= 2 << 30 else 0)


def memory_error(num_keys: int, dim: int, memory_budget: int) -> str:
    return (f"the kNN-LM store of {num_keys:,} keys x {dim} needs {index_bytes('ivfpq', num_keys, dim) / 2**30:.2f} "
            f"GiB for its smallest index (IVF-PQ), over --memory-budget {memory_budget / 2**30:.2f} GiB; raise "
            f"--memory-budget or search fewer keys (--knn-max-keys)")


def choose_index_kind(num_keys: int, dim: int, num_queries: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """``auto``: exact search while queries x keys x width stays under ``EXACT_MAX_WORK``; else IVF over the
    fp16 keys while it fits ``memory_budget``; else IVF-PQ, re-scored from the fp16 keys. A ValueError when not
    even IVF-PQ fits the budget."""
    if num_queries * num_keys * dim <= EXACT_MAX_WORK:
        return "exact"
    if index_bytes("ivf", num_keys, dim) <= memory_budget:
        return "ivf"
    if index_bytes("ivfpq", num_keys, dim) > memory_budget:
        raise ValueError(memory_error(num_keys, dim, memory_budget))
    return "ivfpq"


def as_f32(a: np.ndarray) -> np.ndarray:
    """``a`` (e.g. fp16 rows of the memory map) as a float32 array. torch converts fp16 with vector instructions;
    numpy's ``astype`` converts one value at a time, which was most of the time of re-scoring, exact search
    and the index build here (25M values: 0.45-2.7 s against 0.37-0.54 s on this loaded CPU)."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.float32:
        return a
    with warnings.catch_warnings():  # a read-only memory map: torch only reads it here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a).float().numpy()


def exact_l2(xb: np.ndarray, xq: np.ndarray, k: int, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 top ``k`` of ``xq`` over the rows of ``xb`` (any float array, e.g. the fp16 memory map):
    blocks of ``block`` keys (default: 2^26 query-key distances a block, at least 4,096 keys) converted to fp32
    once for all queries, distances as |x|^2 - 2 x.q + |q|^2 by one matrix product (as faiss's BLAS path
    computes them), each block's top k merged into the running top k (bench/knnlm_exact.py measures it against
    faiss.knn per block, what this did before)."""
    q = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32))
    k = min(k, len(xb))
    if len(q) == 0 or k == 0:
        return np.zeros((len(q), k), np.float32), np.full((len(q), k), -1, np.int64)
    q_norms = q.square().sum(1, keepdim=True)  # (nq, 1)
    best_d = torch.empty(len(q), 0)
    best_i = torch.empty(len(q), 0, dtype=torch.int64)
    block = block or max(4096, (1 << 26) // len(q))
    for b in range(0, len(xb), block):
        x = torch.from_numpy(as_f32(xb[b : b + block]))  # (nb, D)
        d = torch.addmm(q_norms + x.square().sum(1)[None, :], q, x.T, alpha=-2.0).clamp_(min=0.0)  # (nq, nb)
        d, i = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False, sorted=False)
        best_d, idx = torch.topk(torch.cat([best_d, d], 1), min(k, best_d.shape[1] + d.shape[1]), dim=1,
                                 largest=False, sorted=False)
        best_i = torch.gather(torch.cat([best_i, i + b], 1), 1, idx)
    best_d, order = torch.sort(best_d, dim=1)
    return best_d.numpy(), torch.gather(best_i, 1, order).numpy()


def rescore_l2(xb: np.ndarray, xq: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared distances of the candidates ``cand`` (nq, kk; -1: none) of the float32 queries ``xq`` from
    the rows of ``xb`` (the fp16 memory map, read once per distinct row in sorted order, or a copy in memory);
    the top ``k``, nearest first."""
    rows, inverse = np.unique(np.maximum(cand.reshape(-1), 0), return_inverse=True)
    vecs = torch.from_numpy(np.ascontiguousarray(xb[rows])).float()  # (u, d)
    g = vecs[torch.from_numpy(inverse.reshape(-1))].view(*cand.shape, -1)  # (nq, kk, d)
    d = (g - torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32))[:, None, :]).square_().sum(-1)
    d[torch.from_numpy(cand < 0)] = float("inf")
    top = torch.topk(d, min(k, cand.shape[1]), dim=1, largest=False, sorted=True)
    return top.values.numpy(), np.take_along_axis(cand, top.indices.numpy(), 1)


class KeySearch:
    """Nearest keys of a ``KnnStore`` by squared L2 distance, in faiss's names: ``search(xq, k) -> (D, I)``,
    nearest first, ``D`` exact squared distances and ``I`` key ids (-1 where fewer than k were found).

    - ``exact``: brute force over the memory-mapped keys, ``block`` keys converted to fp32 at a time.
    - ``ivf``: ``IndexIVFScalarQuantizer`` with fp16 codes, i.e. the fp16 keys themselves (2 D bytes a key in
      memory): its distances are exact for the stored keys; ``nprobe`` of its lists searched a query.
    - ``ivfpq``: ``IndexIVFPQ`` (D / 4 bytes a key) whose ``refine`` x k candidates are re-scored from the fp16
      keys (``keys``: the store's memory map, read in sorted order a query batch at a time, or a copy in memory).
    """

    def __init__(self, store: KnnStore, kind: str, index=None, nprobe: int = 8, refine: int = 8,
                 keys: np.ndarray | None = None):
        self.store, self.kind, self.index, self.nprobe, self.refine = store, kind, index, nprobe, refine
        self.keys = store.keys if keys is None else keys

    def _set_nprobe(self) -> None:
        if self.index is None:
            return
        faiss = _faiss(NEEDS_FAISS)
        ivf = faiss.extract_index_ivf(self.index)
        ivf.nprobe = min(self.nprobe, ivf.nlist)
        hnsw = getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None)  # a read index's quantizer is a bare Index
        if hnsw is not None:
            hnsw.efSearch = max(2 * ivf.nprobe, 32)

    def candidates(self, q: np.ndarray, kk: int) -> np.ndarray:
        """The index's ``kk`` best candidates of each query (for ``ivfpq``, in the order of its PQ distances)."""
        self._set_nprobe()
        scanned = min(1.0, self.nprobe / self.index.nlist) * self.store.num_keys
        with faiss_threads(int(len(q) * scanned * self.store.dim)):
            return self.index.search(q, kk)

    def search(self, xq: np.ndarray, k: int, batch_size: int = 8192,
               progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
        k = int(min(k, self.store.num_keys))
        D = np.empty((len(xq), k), dtype=np.float32)
        I = np.empty((len(xq), k), dtype=np.int64)
        kk = min(self.store.num_keys, self.refine * k)
        if self.kind == "ivfpq":  # bound the re-scored candidates' vectors (queries x kk x D fp32) to 256 MB
            batch_size = max(1, min(batch_size, (1 << 26) // (kk * self.store.dim)))
        for b in range(0, len(xq), batch_size):
            q = np.ascontiguousarray(xq[b : b + batch_size], dtype=np.float32)
            if self.kind == "exact":
                d, i = exact_l2(self.keys, q, k)
            elif self.kind == "ivf":
                d, i = self.candidates(q, k)
            else:
                d, i = rescore_l2(self.keys, q, self.candidates(q, kk)[1], k)
            D[b : b + len(q)], I[b : b + len(q)] = d, np.where(np.isfinite(d) & (d < 1e37), i, -1)
            if progress is not None:
                progress(len(q))
        return D, I

    def settings(self) -> dict:
        out = {"kind": self.kind}
        if self.index is not None:
            out["nprobe"] = self.nprobe
        if self.kind == "ivfpq":
            out["refine"] = self.refine
            out["rescored_from"] = "memory" if self.keys is not self.store.keys else "memory map"
        return out


def build_ivf(store: KnnStore, kind: str, seed: int = 0, progress: Progress | None = None):
    """A trained and filled ``ivf`` or ``ivfpq`` index over ``store``'s keys, trained on a random sample.
    (Retrieval's ``build_dense_index`` builds inner-product indexes over chunk vectors, with other sizes.)
    A large store (``ivf_lists``) has an HNSW graph over the centroids (faiss's ``IVF..._HNSW32``): keys, and
    k-means's training keys, are assigned to lists through it, not by comparing each key with every centroid."""
    faiss = _faiss(NEEDS_FAISS)
    n, d = store.num_keys, store.dim
    nlist, points, hnsw = ivf_lists(n)
    quantizer = faiss.IndexHNSWFlat(d, 32) if hnsw else faiss.IndexFlatL2(d)
    if kind == "ivf":  # fp16 codes of the keys themselves (not of residuals): exact, half IndexIVFFlat's memory
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2,
                                              False)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, nlist, _pq_m(d, dims_per_byte=4), 8 if n >= 256 * 39 else 4,
                                 faiss.METRIC_L2)
        index.pq.cp.seed = seed
    index.cp.seed, index.cp.niter, index.cp.min_points_per_centroid = seed, 10, min(points, 39)
    if hnsw:  # k-means assigns through a graph of its centroids too, then the centroids go into the quantizer's
        clustering = faiss.IndexHNSWFlat(d, 32)
        clustering.hnsw.efConstruction, clustering.hnsw.efSearch = 40, 64
        index.clustering_index = clustering
        quantizer.hnsw.efConstruction = 40
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, points * nlist), replace=False))
    with faiss_threads(len(sample) * d * nlist * 10):
        index.train(as_f32(store.keys[sample]))
    if hnsw:
        quantizer.hnsw.efSearch = 32
    for b in range(0, n, 131_072):
        with faiss_threads(n * d * nlist):
            index.add(as_f32(store.keys[b : b + 131_072]))
        if progress is not None:
            progress(min(131_072, n - b))
    return index


def open_key_search(store: KnnStore, kind: str, nprobe: int = 8, seed: int = 0,
                    progress_factory: ProgressFactory | None = None, refine: int = 8,
                    memory_budget: int | None = None) -> tuple[KeySearch, dict]:
    """A ``KeySearch`` of ``kind`` over ``store``; an approximate index is loaded from ``index-<kind>.faiss``
    or built and saved there (atomically, recorded in the manifest). Returns it and a note on how it was had.
    With ``memory_budget``: refused (ValueError) when the index does not fit it, and the fp16 keys are copied
    into memory for re-scoring when they fit beside the index."""
    if kind == "exact":
        return KeySearch(store, kind), {"kind": kind}
    if kind not in ("ivf", "ivfpq"):
        raise ValueError(f"unknown kNN-LM index {kind!r}; pick one of {', '.join(INDEX_KINDS)}")
    need = index_bytes(kind, store.num_keys, store.dim)
    if memory_budget is not None and need > memory_budget:
        if kind == "ivfpq":
            raise ValueError(memory_error(store.num_keys, store.dim, memory_budget))
        raise ValueError(f"an ivf index over {store.num_keys:,} keys x {store.dim} needs {need / 2**30:.2f} GiB, "
                         f"over --memory-budget {memory_budget / 2**30:.2f} GiB; use --knn-index ivfpq or raise it")
    faiss = _faiss(NEEDS_FAISS)
    name = f"{kind}{store.file_tag()}"
    path = store.path / f"index-{name}.faiss"
    entry = store.manifest.get("indexes", {}).get(name)
    keys = None
    if kind == "ivfpq" and memory_budget is not None and need + store.num_keys * store.dim * 2 <= memory_budget:
        keys = np.ascontiguousarray(store.keys)  # sequential read; random re-scoring reads then cost nothing
    if entry is not None and entry.get("version") == INDEX_VERSION and path.is_file():
        index = faiss.read_index(str(path))
        return KeySearch(store, kind, index, nprobe, refine, keys), {**entry, "reused": True}
    t0 = time.perf_counter()
    progress = progress_factory(store.num_keys, f"kNN-LM {kind} index (adding keys)") if progress_factory else None
    index = build_ivf(store, kind, seed, progress)
    with writing_file(path) as tmp:
        faiss.write_index(index, str(tmp))
    entry = {"kind": kind, "version": INDEX_VERSION, "file": path.name, "nlist": int(index.nlist),
             "keys": store.num_keys, "bytes": path.stat().st_size,
             "build_seconds": round(time.perf_counter() - t0, 3)}
    manifest_path = store.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())  # the file's, which a build may have advanced
    manifest.setdefault("indexes", {})[name] = entry
    store.manifest.setdefault("indexes", {})[name] = entry
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    return KeySearch(store, kind, index, nprobe, refine, keys), {**entry, "reused": False}


def _recall_of(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approx, exact))
    return hits / max(1, int((exact >= 0).sum()))


def recall(search: KeySearch, xq: np.ndarray, k: int, num_queries: int = 100, seed: int = 0) -> float:
    """Share of the exact top ``k`` that ``search`` finds, on a random sample of the queries ``xq``."""
    if search.kind == "exact":
        return 1.0
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(xq), size=min(num_queries, len(xq)), replace=False))
    q = np.ascontiguousarray(xq[sample], dtype=np.float32)
    exact = exact_l2(search.store.keys, q, k)[1]
    return _recall_of(search.search(q, k)[1], exact)


def choose_settings(search: KeySearch, q: np.ndarray, exact_I: np.ndarray, k: int,
                    target: float = DEFAULT_RECALL) -> dict:
    """Set ``search``'s nprobe (and, for ivfpq, refine) to the fastest pair whose recall@``k`` on the queries ``q``
    against their exact neighbours ``exact_I`` (their exact top k or more, nearest first) reaches ``target``;
    the most thorough pair tried when none does. Each nprobe (ascending) is searched once for its most
    candidates; refine r re-scores the first r x k of them (faiss returns them by PQ distance). The time of each
    pair is measured on ``q``. Returns what was tried and chosen."""
    if search.kind == "exact":
        return {"nprobe": None, "refine": None, "recall": 1.0, "tried": []}
    exact = exact_I[:, :k]
    refines = REFINES if search.kind == "ivfpq" else (1,)
    nlist = _faiss(NEEDS_FAISS).extract_index_ivf(search.index).nlist
    tried, best = [], None
    for nprobe in [p for p in NPROBES if p < nlist] + [nlist]:
        search.nprobe = nprobe
        kk = min(search.store.num_keys, max(refines) * k)
        t0 = time.perf_counter()
        cand = search.candidates(q, kk)[1]
        t_scan = time.perf_counter() - t0
        for refine in refines:
            c = cand[:, : refine * k]
            t0 = time.perf_counter()
            if search.kind == "ivfpq":
                found = rescore_l2(search.keys, q, c, k)[1]
            else:
                found = c
            seconds = t_scan + time.perf_counter() - t0  # the scan barely depends on how many it returns
            r = _recall_of(found, exact)
            tried.append({"nprobe": nprobe, "refine": refine, "recall": round(r, 4),
                          "ms_per_query": round(1000 * seconds / len(q), 4)})
            if r >= target:
                if best is None or seconds < best[0]:
                    best = (seconds, nprobe, refine, r)
                break
        if best is not None and nprobe >= 4 * best[1]:  # more lists only cost more from here
            break
    if best is None:
        last = tried[-1]
        best = (None, last["nprobe"], last["refine"], last["recall"])
    search.nprobe, search.refine = best[1], best[2]
    return {"nprobe": best[1], "refine": best[2] if search.kind == "ivfpq" else None, "recall": round(best[3], 4),
            "target": target, "k": k, "queries": len(q), "tried": tried}


def search_resumable(search: KeySearch, xq: np.ndarray, k: int, folder: Path, identity: dict,
                     progress: Progress | None = None, batch_size: int = 16_384) -> tuple[np.ndarray, np.ndarray, bool]:
    """``search.search(xq, k)`` written to ``folder`` (``D.f32``, ``I.i64`` memory maps) ``batch_size`` queries at
    a time, the count done recorded every ``CHECKPOINT_SECONDS``: a killed search resumes from its last record
    while ``identity`` (what the results depend on) is unchanged. Returns D, I (in memory) and whether every
    batch was reused. D and I stay memory-mapped (read-only use: the caller reads them a block at a time)."""
    n, k = len(xq), int(min(k, search.store.num_keys))
    manifest_path = folder / "manifest.json"
    manifest = read_manifest(manifest_path)
    if manifest is not None and (manifest.get("identity") != identity or manifest.get("shape") != [n, k]):
        manifest = None
    if manifest is None:
        with writing_folder(folder) as tmp:
            for file, size in (("D.f32", n * k * 4), ("I.i64", n * k * 8)):
                with open(tmp / file, "wb") as f:
                    f.truncate(size)
            manifest = {"identity": identity, "shape": [n, k], "done": 0, "seconds": 0.0}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    D = np.memmap(folder / "D.f32", dtype=np.float32, mode="r+", shape=(n, k))
    I = np.memmap(folder / "I.i64", dtype=np.int64, mode="r+", shape=(n, k))
    start = done = manifest["done"]
    if done and progress is not None:
        progress(done)
    last, t0 = time.perf_counter(), time.perf_counter()
    base = float(manifest.get("seconds", 0.0))
    while done < n:
        hi = min(n, done + batch_size)
        D[done:hi], I[done:hi] = search.search(xq[done:hi], k, progress=progress)
        done = hi
        if done == n or time.perf_counter() - last >= CHECKPOINT_SECONDS:
            D.flush()
            I.flush()
            manifest.update(done=done, seconds=round(base + time.perf_counter() - t0, 3))
            atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
            last = time.perf_counter()
    return D, I, start >= n
