"""What kNN-LM's evaluation searches, with which settings, in which order: the measured, not fixed, cost.

1. The index: ``exact``, ``ivf`` or ``ivfpq`` (``auto``: by the work of an exact search and ``--memory-budget``).
2. A sample of the tuning queries (``exact_sample``) is searched exactly with ``k_max``: the reference that
   nprobe and refine are chosen against (``search.choose_settings``: the fastest pair reaching the recall target),
   and that the final gain is checked against.
3. At most ``tune_queries`` tuning queries (a seeded sample) are searched with ``k_max`` and tuned on: lambda, k,
   the temperature, and lambda and k per bin of the nearest distance. Tuning needs large k; scoring does not.
4. The scored queries are searched once, at the largest k the tuning uses, with settings chosen for that k.
5. ``sample_check``: on the exact sample (tuning tokens, never scored ones), the kNN-LM gain in bits per byte with
   the chosen search against the gain with exact neighbours.

Every search writes its batches to ``RUN/knnlm/search-<id>/`` and the chosen settings to
``RUN/knnlm/settings-<id>.json``, so a killed evaluation resumes with the same settings and the batches done.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from knnformer.eval.knnlm.search import KeySearch, choose_index_kind, choose_settings, open_key_search, search_resumable
from knnformer.eval.knnlm.store import KnnStore, Progress, ProgressFactory
from knnformer.eval.knnlm.tune import interpolate, interpolate_by_distance, knn_logprobs
from knnformer.io import atomic_write_text

DEFAULT_TUNE_QUERIES = 32_768
"""Tuning tokens searched with k_max and tuned on (a seeded sample when there are more): enough for 32 bins of
1,000, and a 4-figure estimate of each grid point's loss."""
DEFAULT_EXACT_SAMPLE = 1_000
"""Tuning tokens searched exactly: what recall and the gain against exact search are measured on."""


@dataclass
class Queries:
    """Queries of a run of tokens: hidden states ``h`` (n, D) fp32, LM log-probabilities ``logp`` (n,) and
    targets ``y`` (n,); once searched, squared distances ``D`` and key ids ``I`` (n, k) of their neighbours.
    ``source`` identifies them (split, its tokens, rows) for the searches kept on disk."""

    h: np.ndarray
    logp: np.ndarray
    y: np.ndarray
    D: np.ndarray | None = None
    I: np.ndarray | None = None
    source: dict = field(default_factory=dict)

    def distances(self) -> np.ndarray:
        """``D`` with inf where no key was found."""
        return np.where(self.I >= 0, self.D, np.inf)

    def matches(self, values: np.ndarray) -> np.ndarray:
        """True where a found key's value (``values``: the store's) is the query's target."""
        return (values[np.maximum(self.I, 0)] == self.y[:, None]) & (self.I >= 0)

    def subset(self, rows: np.ndarray) -> Queries:
        return Queries(np.asarray(self.h[rows], dtype=np.float32), self.logp[rows], self.y[rows],
                       source={**self.source, "rows_sha256": _sha(rows.tobytes()), "rows": len(rows)})


def interpolated(tuned: dict, binned: dict | None, q: Queries, values: np.ndarray,
                 rows: int = 32_768) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-lambda and the final (per distance bin when ``binned``) interpolated log-probabilities of ``q``,
    ``rows`` queries at a time (p_knn for every k of 400k queries at k 256 would hold gigabytes of float64)."""
    singles, finals = [], []
    for b in range(0, len(q.y), rows):
        part = Queries(q.h, q.logp[b : b + rows], q.y[b : b + rows], np.asarray(q.D[b : b + rows]),
                       np.asarray(q.I[b : b + rows]))
        dist, match = part.distances(), part.matches(values)
        knn = knn_logprobs(dist, match, tuned["temperature"], [tuned["k"]])
        singles.append(interpolate(part.logp, knn[:, 0], tuned["lambda"]))
        finals.append(singles[-1] if binned is None else
                      interpolate_by_distance(part.logp, dist, match, tuned["temperature"], binned))
    single = torch.cat(singles) if singles else torch.zeros(0, dtype=torch.float64)
    return single, (torch.cat(finals) if finals else single)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _key(identity: dict) -> str:
    return _sha(json.dumps(identity, sort_keys=True).encode())[:16]


def _settings(search: KeySearch, q: np.ndarray, exact_I: np.ndarray, k: int, nprobe: int | None, refine: int | None,
              target: float, identity: dict) -> dict:
    """nprobe and refine for searches at ``k``: those given, else chosen by recall on the exact sample (once:
    kept in the store, so a resumed evaluation searches with the same)."""
    if search.kind == "exact":
        return {"recall": 1.0}
    fixed = nprobe is not None and (refine is not None or search.kind == "ivf")
    if fixed:
        search.nprobe, search.refine = nprobe, refine or search.refine
        found = search.search(q, k)[1]
        hits = sum(len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(found, exact_I[:, :k]))
        return {"nprobe": nprobe, "refine": refine, "recall": round(hits / max(1, (exact_I[:, :k] >= 0).sum()), 4),
                "given": True}
    path = search.store.path / f"settings-{_key({**identity, 'k': k, 'target': target})}.json"
    if path.is_file():
        choice = json.loads(path.read_text())
    else:
        choice = choose_settings(search, q, exact_I, k, target)
        atomic_write_text(path, json.dumps(choice, indent=2))
    search.nprobe = nprobe or choice["nprobe"]
    search.refine = refine or choice["refine"] or search.refine
    return choice


def search_and_tune(knn: KnnStore, s, tuning: Queries, scored: Queries,
                    tune_fn: Callable[[Queries, Progress | None], tuple[dict, dict | None]],
                    token_bytes: np.ndarray, progress_factory: ProgressFactory | None,
                    seconds: dict[str, float]) -> dict[str, Any]:
    """Steps 1-5 of the module's docstring for the settings ``s`` (``KnnLmSettings``); fills ``scored.D`` and
    ``scored.I`` and the stages' ``seconds``. Returns the tuning, the bins, a note on the index and search, the k
    searched for tuning and the sample check."""
    def bar(total: int, what: str) -> Progress | None:
        return progress_factory(total, what) if progress_factory else None

    if s.k is not None and s.k > knn.num_keys:
        raise ValueError(f"kNN-LM k={s.k} is more than the {knn.num_keys} keys of the store; lower k")
    k_max = min(s.k_max, knn.num_keys)
    kind = s.index
    if kind == "auto":
        kind = choose_index_kind(knn.num_keys, knn.dim, len(tuning.y) + len(scored.y), s.memory_budget)
    t0 = time.perf_counter()
    search, index_info = open_key_search(knn, kind, s.nprobe or 8, progress_factory=progress_factory,
                                         refine=s.refine or 8, memory_budget=s.memory_budget)
    seconds["index"] = time.perf_counter() - t0
    base = {"store": knn.manifest["identity"], "keys": knn.num_keys, "kind": kind,
            "index": {key: index_info.get(key) for key in ("file", "version", "bytes", "build_seconds")}}

    rng = np.random.default_rng(0)
    n_tune = len(tuning.y)
    rows = np.arange(n_tune) if n_tune <= s.tune_queries else np.sort(rng.choice(n_tune, s.tune_queries, False))
    tune_q = tuning.subset(rows)
    ex_rows = np.sort(rng.choice(len(rows), min(s.exact_sample, len(rows)), replace=False))
    exact_q = tune_q.subset(ex_rows)
    exact_I = exact_D = None
    if kind != "exact":
        t0 = time.perf_counter()
        ident = {**base, "kind": "exact", "index": None, "queries": exact_q.source, "k": k_max}
        exact_D, exact_I, _ = search_resumable(KeySearch(knn, "exact"), exact_q.h, k_max,
                                               knn.path / f"search-{_key(ident)}", ident,
                                               bar(len(exact_q.y), "kNN-LM exact search of a sample"), batch_size=250)
        seconds["exact_sample"] = time.perf_counter() - t0
    sample_id = {**base, "sample": exact_q.source}

    t0 = time.perf_counter()
    chosen_tune = _settings(search, exact_q.h, exact_I, k_max, s.nprobe, s.refine, s.recall_target, sample_id)
    ident = {**base, **search.settings(), "queries": tune_q.source, "k": k_max}
    tune_q.D, tune_q.I, _ = search_resumable(search, tune_q.h, k_max, knn.path / f"search-{_key(ident)}", ident,
                                             bar(len(tune_q.y), f"kNN-LM search (tuning, k={k_max})"))
    seconds["search_tuning"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tuned, binned = tune_fn(tune_q, bar(16, "kNN-LM tuning (temperatures)"))
    seconds["tuning"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    k_score = max([tuned["k"]] + (binned["k"] if binned else []))
    chosen = _settings(search, exact_q.h, exact_I, k_score, s.nprobe, s.refine, s.recall_target, sample_id)
    ident = {**base, **search.settings(), "queries": scored.source, "k": k_score}
    scored.D, scored.I, reused = search_resumable(search, scored.h, k_score, knn.path / f"search-{_key(ident)}",
                                                  ident, bar(len(scored.y), f"kNN-LM search (scored, k={k_score})"))
    seconds["search_scored"] = time.perf_counter() - t0
    seconds["search"] = seconds.get("exact_sample", 0.0) + seconds["search_tuning"] + seconds["search_scored"]

    check = None
    recall_at_k = 1.0
    if kind != "exact":
        approx = Queries(exact_q.h, exact_q.logp, exact_q.y, *search.search(exact_q.h, k_score))
        exact = Queries(exact_q.h, exact_q.logp, exact_q.y, exact_D[:, :k_score], exact_I[:, :k_score])
        hits = sum(len(np.intersect1d(a[a >= 0], e[e >= 0]))
                   for a, e in zip(approx.I[:, : tuned["k"]], exact.I[:, : tuned["k"]]))
        recall_at_k = hits / max(1, int((exact.I[:, : tuned["k"]] >= 0).sum()))
        check = _sample_check(tuned, binned, exact, approx, knn.values, token_bytes)
    info = {**index_info, **search.settings(), "recall_at_k": round(recall_at_k, 4), "k_searched": k_score,
            "tune_queries": len(tune_q.y), "settings_for_tuning": chosen_tune, "settings_for_scoring": chosen,
            "scored_search_reused": reused}
    return {"tuned": tuned, "binned": binned, "index": info, "k_max": k_max, "sample_check": check}


def _sample_check(tuned: dict, binned: dict | None, exact: Queries, approx: Queries, values: np.ndarray,
                  token_bytes: np.ndarray) -> dict:
    """Bits per byte of the exact sample: LM alone, kNN-LM with exact neighbours and with the chosen search."""
    num_bytes = max(1, int(token_bytes[exact.y].sum()))

    def bpb(logp) -> float:
        return float(-torch.as_tensor(logp, dtype=torch.float64).sum()) / math.log(2) / num_bytes

    lm = bpb(exact.logp)
    with_exact = bpb(interpolated(tuned, binned, exact, values)[1])
    with_approx = bpb(interpolated(tuned, binned, approx, values)[1])
    gain, exact_gain = lm - with_approx, lm - with_exact
    return {"queries": len(exact.y), "lm_bits_per_byte": round(lm, 6), "exact_bits_per_byte": round(with_exact, 6),
            "bits_per_byte": round(with_approx, 6), "gain_bits_per_byte": round(gain, 6),
            "exact_gain_bits_per_byte": round(exact_gain, 6),
            "gain_vs_exact": round(gain / exact_gain, 5) if exact_gain else None}
