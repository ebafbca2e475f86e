"""kNN-LM (Khandelwal et al., 2020): the model's next-token distribution interpolated with one read off the
nearest stored hidden states of the train split.

    p(w | x)     = lambda * p_knn(w | x) + (1 - lambda) * p_lm(w | x)
    p_knn(w | x) = sum over the k nearest keys j of h(x) whose value v_j = w of softmax_j(-d_j / temperature)

with ``d_j`` the squared L2 distance between ``h(x)``, the model's final normed hidden state, and key j.

The store, one per run, in ``RUN/knnlm/``::

    manifest.json        what built it: checkpoint (step, sha256 of its weights), datastore (corpus sha256,
                         tokenizer), how the hidden states were computed (retrieval, windows, dtype), count, width
    keys.f16             (N, D) fp16 hidden states of every train position, memory-mapped
    values.npy           (N,) the train token that followed each key
    index-<kind>.faiss   an approximate index over the keys, built the first time a search needs it

Keys are computed with evaluation's windows (consecutive windows of the context, every train position once),
so a key has the history a scored position has. A store is reused while its manifest matches the run's newest
checkpoint and datastore, and rebuilt otherwise; every file is written under a temporary name and renamed.

Leakage and tuning: queries from valid or test search the train keys only. lambda, k and the temperature are
tuned on tokens that are not scored (then lambda and k once more per bin of the nearest key's distance, up to
32 quantile bins of at least 1,000 tuning queries; the JSON gives the one-lambda figure too): on valid when scoring test; when scoring valid, on the targets of its first
half, and only its second half is scored. Neighbours are searched once with the largest k; every combination
of the grid is then scored from them (running sums over the sorted neighbours give every k at once).

A retrieval model's hidden states (keys and queries alike) are computed with its precomputed RETRO neighbours
when retrieval is on, the same neighbours ``evaluate`` gives it, so p_lm is the retrieval model's distribution.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from knnformer.data.datastore import Datastore
from knnformer.eval.overlap import filtered_figures, split_overlaps
from knnformer.eval.scoring import NeighbourFn, neighbour_fn_for, window_batches, window_plan
from knnformer.io import file_sha256
from knnformer.model.transformer import Transformer
from knnformer.retrieval.index import faiss_threads
from knnformer.run.record import load_run, open_run_datastore, run_config, run_derived, run_neighbours, run_retrieval
from knnformer.runtime import autocast, torch_threads

logger = logging.getLogger(__name__)

STORE_DIR = "knnlm"
FORMAT_VERSION = 1
INDEX_KINDS = ("auto", "exact", "ivf", "ivfpq")
INDEX_VERSION = 2
"""Bumped when ``build_ivf`` changes what it builds: an index of another version is rebuilt."""
EXACT_MAX_WORK = 5e10
"""Largest queries x keys x width for which ``auto`` searches exactly (about 10 s on this shared CPU)."""
DEFAULT_MEMORY_BUDGET = 2 << 30
DEFAULT_K_MAX = 256
LAMBDA_BINS = 32  # at most; one bin per 1,000 tuning queries
LAMBDAS = tuple(round(0.05 * i, 2) for i in range(19))  # 0 .. 0.9

Progress = Callable[[int], None]
ProgressFactory = Callable[[int, str], Progress]


# ---------------------------------------------------------------- hidden states

@torch.no_grad()
def split_hidden_states(model: Transformer, tokens: np.ndarray, out: np.ndarray, batch_size: int = 32,
                        dtype: str = "float32", neighbours: NeighbourFn | None = None,
                        progress: Progress | None = None, logprobs: bool = False) -> np.ndarray | None:
    """Write into ``out[p - 1]`` (an (N - 1, D) array, e.g. a memory map) the final hidden state that predicts
    token p, for p = 1 .. N - 1, over evaluation's consecutive windows of the context (batched as
    ``score_tokens`` batches them). With ``logprobs``, also return log p_lm(token p) as a float64 (N - 1,)
    array, the very values ``score_tokens`` turns into losses."""
    context = model.config.context
    model.eval()
    device = next(model.parameters()).device
    plan = window_plan(len(tokens), context, context)
    logp = np.zeros(max(0, len(tokens) - 1), dtype=np.float64) if logprobs else None
    for group, n, x, y, inputs in window_batches(tokens, plan, batch_size, neighbours, device):
        with autocast(dtype, device):
            h = model.hidden_states(x, **inputs)  # (B, n, D)
            logits = F.linear(h, model.embed.weight) if logprobs else None  # (B, n, V), as Transformer.forward
        h = h.float().cpu().numpy()
        if logprobs:
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
            losses = losses.view(len(group), n).cpu().double().numpy()
        for row, (begin, first, _) in enumerate(group):
            out[begin + first : begin + n] = h[row, first:]
            if logprobs:
                logp[begin + first : begin + n] = -losses[row, first:]
        if progress is not None:
            progress(sum(g[2] - g[1] for g in group))
    return logp


# ---------------------------------------------------------------- the store

@dataclass
class KnnStore:
    """Keys (fp16, memory-mapped) and values of a run's kNN-LM store."""

    path: Path
    manifest: dict
    keys: np.ndarray
    values: np.ndarray

    @property
    def num_keys(self) -> int:
        return len(self.values)

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    @classmethod
    def open(cls, path: str | Path) -> "KnnStore":
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            n, d = manifest["num_keys"], manifest["dim"]
            keys = np.memmap(path / "keys.f16", dtype=np.float16, mode="r", shape=(n, d))
            values = np.load(path / "values.npy")
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"the kNN-LM store {path} is incomplete or corrupt ({e}); delete it to rebuild") from None
        if len(values) != n:
            raise ValueError(f"the kNN-LM store {path} holds {len(values)} values for {n} keys; delete it to rebuild")
        return cls(path, manifest, keys, values)


def store_identity(record: dict, ckpt_path: Path, store: Datastore, retrieval: dict | None,
                   dtype: str, context: int) -> dict[str, Any]:
    """What the keys depend on: the weights, the train tokens, the windows and, for a retrieval model, the
    neighbours it read. A store whose manifest holds another identity is rebuilt."""
    ckpt_path = Path(ckpt_path)
    sums_path = ckpt_path / "checksums.json"
    sums = json.loads(sums_path.read_text()) if sums_path.is_file() else {}
    weights_sha = sums.get("model.safetensors") or file_sha256(ckpt_path / "model.safetensors")
    lo, hi = store.split_range("train")
    return {
        "format_version": FORMAT_VERSION,
        "checkpoint": {"step": int(ckpt_path.name.split("-")[1]), "weights_sha256": weights_sha},
        "datastore": {"corpus_sha256": store.manifest["corpus_sha256"],
                      "tokenizer_fingerprint": store.manifest["tokenizer"]["fingerprint"], "train": [lo, hi]},
        "hidden": {"windows": "consecutive", "context": context, "dtype": dtype, "retrieval": retrieval},
    }


def _mismatch(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first key path where two identities differ, or None."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _mismatch(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}"
    return None


def open_or_build_store(run_dir: str | Path, model: Transformer, identity: dict, train_tokens: np.ndarray,
                        batch_size: int = 32, dtype: str = "float32", neighbours: NeighbourFn | None = None,
                        progress: Progress | None = None, force: bool = False) -> tuple[KnnStore, bool]:
    """The run's store, reused when its manifest's identity equals ``identity`` (and not ``force``), else
    rebuilt: keys written to a memory map in a temporary folder, which then replaces ``RUN/knnlm``. Returns
    the store and whether it was reused."""
    final = Path(run_dir) / STORE_DIR
    if final.is_dir() and not force:
        try:
            old = KnnStore.open(final)
            why = _mismatch(old.manifest.get("identity", {}), identity)
            if why is None:
                return old, True
            logger.info("rebuilding the kNN-LM store %s: %s changed", final, why)
        except ValueError as e:
            logger.info("rebuilding the kNN-LM store: %s", e)
    n, d = len(train_tokens) - 1, model.config.dim
    if n < 1:
        raise ValueError("the train split has fewer than 2 tokens: there is nothing to store for kNN-LM")
    tmp = final.parent / f".{STORE_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        keys = np.memmap(tmp / "keys.f16", dtype=np.float16, mode="w+", shape=(n, d))
        split_hidden_states(model, train_tokens, keys, batch_size, dtype, neighbours, progress)
        keys.flush()
        if not all(np.isfinite(keys[b : b + 65_536]).all() for b in range(0, n, 65_536)):
            raise ValueError("some hidden states overflow fp16; the kNN-LM store cannot hold them")
        del keys
        values = np.asarray(train_tokens[1:], dtype=np.int32)
        np.save(tmp / "values.npy", values)
        manifest = {"identity": identity, "num_keys": n, "dim": d, "key_dtype": "float16",
                    "build_seconds": round(time.perf_counter() - t0, 3), "indexes": {},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if final.exists():
            old_dir = final.parent / f".{STORE_DIR}.old-{os.getpid()}"
            os.replace(final, old_dir)
            os.replace(tmp, final)
            shutil.rmtree(old_dir)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return KnnStore.open(final), False


# ---------------------------------------------------------------- search

def _faiss():
    try:
        import faiss
    except ImportError:
        raise ValueError("kNN-LM search needs faiss: `pip install faiss-cpu`") from None
    return faiss


def _nlist(n: int) -> int:
    """Inverted lists: about 2 sqrt(n), with at least 40 training points each (faiss's k-means wants 39)."""
    return int(max(1, min(65_536, 2 * int(math.sqrt(n)), n // 40)))


def choose_index_kind(num_keys: int, dim: int, num_queries: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """``auto``: exact search while queries x keys x width stays under ``EXACT_MAX_WORK``; else IVF over the
    fp16 keys while they fit ``memory_budget``; else IVF-PQ, re-scored from the memory-mapped fp16 keys."""
    if num_queries * num_keys * dim <= EXACT_MAX_WORK:
        return "exact"
    if num_keys * dim * 2 <= memory_budget:
        return "ivf"
    return "ivfpq"


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
        faiss = _faiss()
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
                    d, i = rescore_l2(self.store.keys, q, cand, k)
            D[b : b + len(q)], I[b : b + len(q)] = d, np.where(np.isfinite(d) & (d < 1e37), i, -1)
            if progress is not None:
                progress(len(q))
        return D, I


def exact_l2(xb: np.ndarray, xq: np.ndarray, k: int, block: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 top ``k`` of ``xq`` over the rows of ``xb`` (any float array, e.g. the fp16 memory map),
    ``block`` rows converted to fp32 at a time."""
    faiss = _faiss()
    k = min(k, len(xb))
    heap = faiss.ResultHeap(len(xq), k, keep_max=False)
    for b in range(0, len(xb), block):
        with faiss_threads(len(xq) * min(block, len(xb)) * xq.shape[1]):
            d, i = faiss.knn(xq, np.ascontiguousarray(xb[b : b + block], dtype=np.float32), k, metric=faiss.METRIC_L2)
        heap.add_result(d, np.where(i >= 0, i + b, -1))
    heap.finalize()
    return heap.D, heap.I


def rescore_l2(xb: np.ndarray, xq: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared distances of the candidates ``cand`` (nq, kk) from the rows of ``xb``; the top ``k``."""
    rows, inverse = np.unique(np.maximum(cand.reshape(-1), 0), return_inverse=True)  # sorted reads
    vecs = np.asarray(xb[rows], dtype=np.float32)[inverse].reshape(*cand.shape, -1)  # (nq, kk, D)
    d = ((vecs - xq[:, None, :]) ** 2).sum(-1)
    d = np.where(cand >= 0, d, np.inf).astype(np.float32)
    top = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, top, 1), np.take_along_axis(cand, top, 1)


def build_ivf(store: KnnStore, kind: str, seed: int = 0, progress: Progress | None = None):
    """A trained and filled ``ivf`` or ``ivfpq`` index over ``store``'s keys, trained on a random sample."""
    faiss = _faiss()
    n, d = store.num_keys, store.dim
    nlist = _nlist(n)
    quantizer = faiss.IndexFlatL2(d)
    if kind == "ivf":  # fp16 codes of the keys themselves (not of residuals): exact, half IndexIVFFlat's memory
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2,
                                              False)
    else:
        m = max(mm for mm in range(1, max(1, d // 4) + 1) if d % mm == 0)  # about 4 dimensions a byte
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8 if n >= 256 * 39 else 4, faiss.METRIC_L2)
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
    faiss = _faiss()
    path = store.path / f"index-{kind}.faiss"
    entry = store.manifest.get("indexes", {}).get(kind)
    if entry is not None and entry.get("version") == INDEX_VERSION and path.is_file():
        index = faiss.read_index(str(path))
        return KeySearch(store, kind, index, nprobe), {**entry, "reused": True}
    t0 = time.perf_counter()
    progress = progress_factory(store.num_keys, f"kNN-LM {kind} index") if progress_factory else None
    index = build_ivf(store, kind, seed, progress)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    entry = {"kind": kind, "version": INDEX_VERSION, "file": path.name, "nlist": int(index.nlist),
             "bytes": path.stat().st_size,
             "build_seconds": round(time.perf_counter() - t0, 3)}
    store.manifest.setdefault("indexes", {})[kind] = entry
    manifest_path = store.path / "manifest.json"
    tmp = manifest_path.with_name(f".manifest.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(store.manifest, indent=2))
    os.replace(tmp, manifest_path)
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


# ---------------------------------------------------------------- interpolation and tuning

def knn_logprobs(D: np.ndarray | torch.Tensor, match: np.ndarray | torch.Tensor, temperature: float,
                 ks: list[int] | None = None) -> torch.Tensor:
    """log p_knn(target) of every query, for every k at once: (nq, kmax) float64, column k - 1 over the k
    nearest keys (with ``ks``, only those columns, in that order). ``D`` (nq, kmax) squared distances,
    nearest first (inf where no key was found); ``match`` (nq, kmax) true where a key's value is the query's
    target. -inf where no key among the k matches.

    Stable without logsumexp: weights are taken relative to each query's nearest key, exp(-(d - d_min) / T),
    so they lie in [0, 1] with a 1 among them, and both running sums (all keys, matching keys) stay >= 0."""
    d = torch.as_tensor(D, dtype=torch.float64)
    m = torch.as_tensor(match, dtype=torch.bool)
    nearest = d.amin(dim=1, keepdim=True)
    nearest = torch.where(torch.isfinite(nearest), nearest, torch.zeros_like(nearest))
    w = torch.exp((nearest - d) / temperature)  # (nq, kmax), 0 where no key was found
    total = torch.cumsum(w, dim=1)
    hit = torch.cumsum(w.masked_fill_(~m, 0.0), dim=1)
    if ks is not None:
        cols = torch.tensor([k - 1 for k in ks])
        total, hit = total[:, cols], hit[:, cols]
    out = torch.log(hit) - torch.log(total)
    return torch.where(hit > 0, out, -math.inf)  # also where no key at all was found (0 / 0)


def interpolate(logp_lm: torch.Tensor | np.ndarray, logp_knn: torch.Tensor | np.ndarray,
                lam: float | torch.Tensor) -> torch.Tensor:
    """log(lam * p_knn + (1 - lam) * p_lm), computed in log space: exact at lam = 0 (the LM's own values)."""
    logp_lm = torch.as_tensor(logp_lm, dtype=torch.float64)
    logp_knn = torch.as_tensor(logp_knn, dtype=torch.float64)
    lam = torch.as_tensor(lam, dtype=torch.float64)
    return torch.logaddexp(torch.log(lam) + logp_knn, torch.log1p(-lam) + logp_lm)


def temperature_scale(D: np.ndarray) -> float:
    """A distance scale for the temperature grid: the median distance to the 8th nearest key (or the
    farthest searched), taken from the queries given (the tuning ones)."""
    col = np.asarray(D[:, min(7, D.shape[1] - 1)], dtype=np.float64)
    col = col[np.isfinite(col) & (col < 1e37)]
    scale = float(np.median(col)) if len(col) else 1.0
    return scale if scale > 0 else 1.0


def k_grid(k_max: int) -> list[int]:
    """1, 2, 4, ... up to ``k_max``, and ``k_max`` itself."""
    ks = [2**i for i in range(int(math.log2(k_max)) + 1) if 2**i <= k_max]
    return ks + ([k_max] if ks[-1] != k_max else [])


def grid_losses(logp_lm: np.ndarray, D: np.ndarray, match: np.ndarray, lambdas, ks: list[int], temperature: float,
                rows: int = 8192) -> np.ndarray:
    """Mean NLL (len(lambdas), len(ks)) of every (lambda, k) at one temperature, ``rows`` queries at a time."""
    log_lam = torch.log(torch.tensor(lambdas, dtype=torch.float64))[:, None, None]  # (L, 1, 1)
    log_rest = torch.log1p(-torch.tensor(lambdas, dtype=torch.float64))[:, None, None]
    total = torch.zeros(len(lambdas), len(ks), dtype=torch.float64)
    for r in range(0, len(logp_lm), rows):
        knn = knn_logprobs(D[r : r + rows], match[r : r + rows], temperature, ks).T  # (K, r)
        lm = torch.as_tensor(logp_lm[r : r + rows], dtype=torch.float64)
        total -= torch.logaddexp(log_lam + knn, log_rest + lm).sum(-1)  # (L, K)
    return (total / max(1, len(logp_lm))).numpy()


def tune(logp_lm: np.ndarray, D: np.ndarray, match: np.ndarray, lambdas=LAMBDAS, ks=None,
         temperatures=None) -> dict[str, Any]:
    """The (lambda, k, temperature) with the lowest mean NLL over the queries given: their LM log-probabilities
    (nq,), squared distances (nq, kmax) and target matches (nq, kmax). Every lambda and k of the grids is tried
    at each temperature. Temperatures: those given, or else, as multiples of ``temperature_scale``, 2^i for i in
    -4..4 (extended by factors of 2 past an end while the end is best), then the best refined by factors
    2^(+-1/2) and 2^(+-1/4)."""
    if len(logp_lm) == 0:
        raise ValueError("no tokens to tune kNN-LM on")
    ks = list(ks) if ks is not None else k_grid(D.shape[1])
    tried: dict[float, np.ndarray] = {}

    def best_at(ts) -> float:
        for t in ts:
            if t not in tried:
                tried[t] = grid_losses(logp_lm, D, match, lambdas, ks, t)
        return min(tried, key=lambda t: tried[t].min())

    if temperatures is not None:
        best_t = best_at(list(temperatures))
    else:
        scale = temperature_scale(D)
        lo, hi = scale / 16, scale * 16
        best_t = best_at([scale * 2.0**i for i in range(-4, 5)])
        for _ in range(8):  # the best at an end of the grid: extend it that way
            if best_t not in (lo, hi):
                break
            if best_t == lo:
                lo /= 2
                best_t = best_at([lo])
            else:
                hi *= 2
                best_t = best_at([hi])
        for step in (0.5, 0.25):
            best_t = best_at([best_t * 2.0**-step, best_t, best_t * 2.0**step])
    losses = tried[best_t]
    j, i = np.unravel_index(np.argmin(losses), losses.shape)
    lm_loss = float(-np.mean(logp_lm))
    return {"loss": float(losses[j, i]), "lambda": float(lambdas[j]), "k": int(ks[i]), "temperature": float(best_t),
            "lm_loss": lm_loss, "tokens": int(len(logp_lm)), "lambdas": list(lambdas), "ks": ks,
            "temperatures": sorted(float(t) for t in tried),
            "best_by_k": {str(k): float(tried[best_t][:, c].min()) for c, k in enumerate(ks)}}


def tune_by_distance(logp_lm: np.ndarray, D: np.ndarray, match: np.ndarray, tuned: dict[str, Any], lambdas,
                     bins: int) -> dict[str, list]:
    """lambda and k per bin of the nearest key's distance, at the tuned temperature (adaptive kNN-LM's idea in
    its simplest form: a query with a close neighbour can trust p_knn more). Bins are quantiles of the tuning
    queries' nearest distances. On tiny shakespeare's valid[half:] this took kNN-LM from 1.631 to 1.613."""
    edges = np.quantile(D[:, 0], np.linspace(0, 1, bins + 1)[1:-1])
    which = np.digitize(D[:, 0], edges)
    out: dict[str, list] = {"edges": edges.tolist(), "lambda": [], "k": [], "tokens": []}
    for b in range(bins):
        sel = which == b
        losses = grid_losses(logp_lm[sel], D[sel], match[sel], lambdas, tuned["ks"], tuned["temperature"])
        j, i = np.unravel_index(np.argmin(losses), losses.shape)
        out["lambda"].append(float(lambdas[j]))
        out["k"].append(int(tuned["ks"][i]))
        out["tokens"].append(int(sel.sum()))
    return out


def interpolate_by_distance(logp_lm: np.ndarray, D: np.ndarray, match: np.ndarray, temperature: float,
                            binned: dict[str, list]) -> torch.Tensor:
    """``interpolate`` with each query's lambda and k taken from its nearest-distance bin (``tune_by_distance``)."""
    which = torch.as_tensor(np.digitize(D[:, 0], binned["edges"]))
    knn = knn_logprobs(D, match, temperature)  # (nq, kmax)
    cols = (torch.tensor(binned["k"]) - 1)[which]
    lam = torch.tensor(binned["lambda"], dtype=torch.float64)[which]
    return interpolate(logp_lm, knn.gather(1, cols[:, None])[:, 0], lam)


def figures(nll: float, num_tokens: int, num_bytes: int) -> dict[str, float]:
    loss = nll / max(1, num_tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": nll / math.log(2) / max(1, num_bytes)}


# ---------------------------------------------------------------- the evaluation

def _retrieval_inputs(record: dict, store: Datastore, retrieval: str, run_dir: str | Path | None = None):
    """For a retrieval run with retrieval on: a function ``split -> NeighbourFn`` giving the model the
    neighbours ``evaluate`` gives it (for a learned retriever, those of the run's last refresh in ``run_dir``;
    with ``retrieval.search.sources=train,past``, merged with the document's past), and what identifies them; for a
    plain LM (or retrieval off): None, None."""
    from knnformer.run.vectors import frozen_vectors

    if retrieval not in ("auto", "on", "off"):
        raise ValueError(f"--retrieval must be on or off, got {retrieval!r}")
    rcfg = run_retrieval(record)
    if retrieval == "on" and not rcfg.enabled:
        raise ValueError("this run was trained without retrieval; evaluate it with --retrieval off")
    if not rcfg.enabled or retrieval == "off":
        return None, None
    neighbours = run_neighbours(record, store, required=True, run_dir=run_dir)
    k, continuation = rcfg.eval_neighbours or rcfg.num_neighbours, rcfg.continuation
    past = "past" in rcfg.search.sources
    identity = {"embedder": neighbours.info["embedder_fingerprint"], "chunk_size": neighbours.chunk_size, "k": k,
                "continuation": continuation, "neighbours_sha256": file_sha256(neighbours.ids_path)}
    if past:  # stores built before ``past`` existed keep their identity
        identity["past"] = True

    frozen = frozen_vectors(store, rcfg, run_derived(record).retriever_input_dim)

    def for_split(split: str) -> NeighbourFn:
        return neighbour_fn_for(neighbours, split, k, continuation, past, frozen)

    return for_split, identity


def evaluate_knn_lm(run_dir: str | Path, split: str = "valid", datastore: str | None = None, batch_size: int = 32,
                    progress_factory: ProgressFactory | None = None, retrieval: str = "auto",
                    k_max: int = DEFAULT_K_MAX, index: str = "auto", nprobe: int = 8,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET, lam: float | None = None, k: int | None = None,
                    temperature: float | None = None, force: bool = False, threads: int | None = None) -> dict[str, Any]:
    """kNN-LM figures of a run's newest checkpoint on ``split`` (valid or test), beside the LM's own on the
    same tokens. Scoring test: tuned on valid. Scoring valid: tuned on the targets of its first half
    ``valid[:half]``, scored on the second ``valid[half:]``. ``lam``, ``k`` and ``temperature``, when given,
    are fixed instead of tuned. The store in ``RUN/knnlm`` is built or reused (``force`` rebuilds it).
    ``threads``: torch threads (None: the run's ``train.threads``; 0: torch's default).

    Memory: the queries' hidden states (tuning and scored tokens, fp32) and their ``k_max`` neighbours'
    distances and ids; the keys stay memory-mapped, and an ``ivf`` index holds them in fp16."""
    t_start = time.perf_counter()
    if split not in ("valid", "test"):
        raise ValueError(f"--knn-lm scores valid or test, not {split!r}: the train split is the kNN-LM store itself")
    if k_max < 1 or (k is not None and not 1 <= k <= k_max):
        raise ValueError(f"kNN-LM needs 1 <= k <= k_max, got k={k}, k_max={k_max}")
    if lam is not None and not 0.0 <= lam < 1.0:
        raise ValueError(f"kNN-LM lambda must be in [0, 1), got {lam}")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"kNN-LM temperature must be positive, got {temperature}")
    if index not in INDEX_KINDS:
        raise ValueError(f"unknown kNN-LM index {index!r}; pick one of {', '.join(INDEX_KINDS)}")
    model, record, ckpt_path = load_run(run_dir)
    if threads is None:
        threads = run_config(record).train.threads
    with torch_threads(threads):
        return _evaluate_knn_lm(run_dir, model, record, ckpt_path, split, datastore, batch_size, progress_factory,
                                retrieval, k_max, index, nprobe, memory_budget, lam, k, temperature, force, t_start)


def _evaluate_knn_lm(run_dir, model, record, ckpt_path, split, datastore, batch_size, progress_factory, retrieval,
                     k_max, index, nprobe, memory_budget, lam, k, temperature, force, t_start) -> dict[str, Any]:
    store = open_run_datastore(record, datastore)
    nb_for, nb_identity = _retrieval_inputs(record, store, retrieval, run_dir)
    dtype = run_config(record).train.dtype
    context = model.config.context
    token_bytes = np.asarray(store.tokenizer.token_bytes)

    def progress(total: int, what: str) -> Progress | None:
        return progress_factory(total, what) if progress_factory else None

    # the store of train keys
    train_tokens = store.require_split("train", 2)
    identity = store_identity(record, ckpt_path, store, nb_identity, dtype, context)
    t0 = time.perf_counter()
    knn_store, reused = open_or_build_store(
        run_dir, model, identity, train_tokens, batch_size, dtype, nb_for("train") if nb_for else None,
        progress(len(train_tokens) - 1, "kNN-LM store (train keys)"), force)
    store_s = time.perf_counter() - t0

    # queries: hidden states and LM log-probabilities of the tuning and the scored tokens
    t0 = time.perf_counter()

    def queries(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens = store.require_split(name, 4 if name == "valid" and split == "valid" else 2)
        h = np.empty((len(tokens) - 1, model.config.dim), dtype=np.float32)
        logp = split_hidden_states(model, tokens, h, batch_size, dtype, nb_for(name) if nb_for else None,
                                   progress(len(tokens) - 1, f"kNN-LM queries ({name})"), logprobs=True)
        return h, logp, np.asarray(tokens[1:], dtype=np.int64)

    if split == "valid":
        h, logp, targets = queries("valid")
        half = (len(targets) + 1) // 2  # targets are tokens 1 .. N - 1; rows below half - 1 tune
        tune_rows, score_rows = slice(0, half - 1), slice(half - 1, len(targets))
        xq_tune, lm_tune, y_tune = h[tune_rows], logp[tune_rows], targets[tune_rows]
        xq_score, lm_score, y_score = h[score_rows], logp[score_rows], targets[score_rows]
        split_info = {"tuned_on": "valid[:half]", "scored": "valid[half:]", "half": half,
                      "tuned_targets": [1, half], "scored_targets": [half, len(targets) + 1]}
    else:
        xq_tune, lm_tune, y_tune = queries("valid")
        xq_score, lm_score, y_score = queries(split)
        split_info = {"tuned_on": "valid", "scored": split,
                      "tuned_targets": [1, len(y_tune) + 1], "scored_targets": [1, len(y_score) + 1]}
    if lam is not None and k is not None and temperature is not None:
        split_info["tuned_on"] = None  # all three given
    queries_s = time.perf_counter() - t0

    # one search of every query with the largest k
    if k is not None and k > knn_store.num_keys:
        raise ValueError(f"kNN-LM k={k} is more than the {knn_store.num_keys} keys of the store; lower k")
    k_max = min(k_max, knn_store.num_keys)
    num_queries = len(xq_tune) + len(xq_score)
    kind = choose_index_kind(knn_store.num_keys, knn_store.dim, num_queries, memory_budget) if index == "auto" else index
    t0 = time.perf_counter()
    search, index_info = open_key_search(knn_store, kind, nprobe, progress_factory=progress_factory)
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = progress(num_queries, "kNN-LM search")
    D_tune, I_tune = search.search(xq_tune, k_max, progress=bar)
    D_score, I_score = search.search(xq_score, k_max, progress=bar)
    search_s = time.perf_counter() - t0

    def matches(I: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (knn_store.values[np.maximum(I, 0)] == y[:, None]) & (I >= 0)

    def distances(D: np.ndarray, I: np.ndarray) -> np.ndarray:
        return np.where(I >= 0, D, np.inf)

    t0 = time.perf_counter()
    ks = [k] if k is not None else None
    temps = [temperature] if temperature is not None else None
    lambdas = [lam] if lam is not None else LAMBDAS
    tuned = tune(lm_tune, distances(D_tune, I_tune), matches(I_tune, y_tune), lambdas, ks, temps)
    knn = knn_logprobs(distances(D_score, I_score), matches(I_score, y_score), tuned["temperature"])
    logp = interpolate(lm_score, knn[:, tuned["k"] - 1], tuned["lambda"])
    num_bytes = int(token_bytes[y_score].sum())
    single = figures(float(-logp.sum()), len(y_score), num_bytes)
    bins = min(LAMBDA_BINS, len(y_tune) // 1000) if split_info["tuned_on"] is not None and lam is None else 1
    binned = None
    if bins > 1:  # lambda and k per nearest-distance bin, tuned on the same tokens as the rest
        binned = tune_by_distance(lm_tune, distances(D_tune, I_tune), matches(I_tune, y_tune), tuned, lambdas, bins)
        logp = interpolate_by_distance(lm_score, distances(D_score, I_score), matches(I_score, y_score),
                                       tuned["temperature"], binned)
    tune_s = time.perf_counter() - t0
    with_knn = figures(float(-logp.sum()), len(y_score), num_bytes)
    lm_alone = figures(float(-np.sum(lm_score)), len(y_score), num_bytes)
    # RETRO's overlap-filtered figures, with the chunks bucketed by the datastore's chunk neighbours (as evaluate
    # buckets a plain LM), so a kNN-LM gain can be read beside the part of it that is copying
    chunk_neighbours = run_neighbours(record, store, required=False, run_dir=run_dir)
    if chunk_neighbours is not None:
        rcfg = run_retrieval(record)
        kk = (rcfg.eval_neighbours or rcfg.num_neighbours) if rcfg.enabled else min(2, chunk_neighbours.k)
        overlaps = split_overlaps(chunk_neighbours, store.require_split(split, 2), split, kk, rcfg.continuation)
        first = split_info["scored_targets"][0]
        with_knn["filtered"] = filtered_figures(-logp.numpy(), y_score, token_bytes, overlaps,
                                                chunk_neighbours.chunk_size, first)
        lm_alone["filtered"] = filtered_figures(-np.asarray(lm_score), y_score, token_bytes, overlaps,
                                                chunk_neighbours.chunk_size, first)
    index_info["recall_at_k"] = round(recall(search, xq_score, tuned["k"]), 4)
    if search.index is not None:
        index_info["nprobe"] = nprobe
    return {
        "split": split, **split_info,
        "tokens": len(y_score), "bytes": num_bytes, **with_knn,
        "lm": lm_alone,
        "lambda": tuned["lambda"], "k": tuned["k"], "temperature": tuned["temperature"],
        "lambda_by_distance": binned,  # None: one lambda and k for every query
        "single_lambda": {key: single[key] for key in ("loss", "bits_per_byte")},
        "tuning": {key: tuned[key] for key in ("tokens", "loss", "lm_loss", "lambdas", "ks", "temperatures",
                                               "best_by_k")},
        "retrieval": "on" if nb_for else "off",
        "store": {"path": str(knn_store.path), "keys": knn_store.num_keys, "dim": knn_store.dim,
                  "bytes": knn_store.nbytes(), "reused": reused},
        "index": index_info, "k_max": k_max,
        "search_seconds": round(search_s, 3),
        "seconds": {"store": round(store_s, 3), "queries": round(queries_s, 3), "index": round(index_s, 3),
                    "search": round(search_s, 3), "tuning": round(tune_s, 3),
                    "total": round(time.perf_counter() - t_start, 3)},
        "checkpoint": str(ckpt_path), "step": int(Path(ckpt_path).name.split("-")[1]),
    }


def format_table(result: dict[str, Any]) -> str:
    """The kNN-LM rows of ``evaluate``'s summary table."""
    r = result
    rows = [("kNN-LM scored", f"{r['scored']} ({r['tokens']:,} tokens), tuned on {r['tuned_on']}"),
            ("kNN-LM loss", f"{r['loss']:.4f} (LM alone {r['lm']['loss']:.4f}, "
                            f"{(r['loss'] / r['lm']['loss'] - 1) * 100:+.1f}%)"),
            ("kNN-LM bits per byte", f"{r['bits_per_byte']:.4f} (LM alone {r['lm']['bits_per_byte']:.4f})"),
            *([("kNN-LM, overlap <= 0.125", f"{r['filtered']['0.125']['bits_per_byte']:.4f} bits/byte (LM alone "
                                               f"{r['lm']['filtered']['0.125']['bits_per_byte']:.4f}; "
                                               f"{r['filtered']['0.125']['fraction']:.0%} of chunks)")]
              if "filtered" in r else []),
            ("kNN-LM lambda, k, temp.", f"{r['lambda']:.2f}, {r['k']}, {r['temperature']:.4g}"
                                        + (f"; per distance bin ({len(r['lambda_by_distance']['lambda'])} bins): "
                                           f"lambda {min(r['lambda_by_distance']['lambda']):.2f}-"
                                           f"{max(r['lambda_by_distance']['lambda']):.2f}, one lambda "
                                           f"{r['single_lambda']['loss']:.4f}" if r.get("lambda_by_distance") else "")),
            ("kNN-LM store", f"{r['store']['keys']:,} keys x {r['store']['dim']}, "
                             f"{r['store']['bytes'] / 2**20:.0f} MiB ({'reused' if r['store']['reused'] else 'built'})"),
            ("kNN-LM search", f"{r['index']['kind']}, recall@{r['k']} {r['index']['recall_at_k']:.3f}, "
                              f"{r['search_seconds']:.1f}s; {r['seconds']['total']:.1f}s in all")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
