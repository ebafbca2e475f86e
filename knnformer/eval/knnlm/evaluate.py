"""kNN-LM's evaluation of a run: build or reuse the store of train keys, compute the queries' hidden states and LM
log-probabilities, search a sample of the tuning tokens with the largest k, tune on them, search the scored tokens
at the tuned k (``schedule``), and score. Every stage reports progress with an estimate of the time left, and keys,
queries, indexes and searched batches are kept in ``RUN/knnlm`` so a killed evaluation resumes.

Leakage and tuning: queries from valid or test search the train keys only. lambda, k and the temperature are
tuned on tokens that are not scored (then lambda and k once more per bin of the nearest key's distance; the JSON
gives the one-lambda figure too): on valid when scoring test; when scoring valid, on the targets of its first
half, and only its second half is scored.

A retrieval model's hidden states (keys and queries alike) are computed with its precomputed RETRO neighbours
when retrieval is on, the same neighbours ``evaluate`` gives it, so p_lm is the retrieval model's distribution.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from knnformer.data.datastore import Datastore
from knnformer.eval.knnlm.schedule import (
    DEFAULT_EXACT_SAMPLE,
    DEFAULT_TUNE_QUERIES,
    Queries,
    interpolated,
    search_and_tune,
)
from knnformer.eval.knnlm.search import DEFAULT_MEMORY_BUDGET, DEFAULT_RECALL, INDEX_KINDS
from knnformer.eval.knnlm.store import (
    KnnStore,
    Progress,
    ProgressFactory,
    open_or_build_queries,
    open_or_build_store,
    store_identity,
)
from knnformer.eval.knnlm.tune import LAMBDA_BINS, LAMBDAS, tune, tune_by_distance
from knnformer.eval.overlap import filtered_figures, split_overlaps
from knnformer.eval.scoring import NeighbourFn, neighbour_fn_for
from knnformer.io import file_sha256
from knnformer.model.transformer import Transformer
from knnformer.run.record import load_run, open_run_datastore, run_config, run_derived, run_neighbours, run_retrieval
from knnformer.runtime import torch_threads

DEFAULT_K_MAX = 256


@dataclass(frozen=True)
class KnnLmSettings:
    """What an evaluation was asked for (``evaluate_knn_lm`` says what each means)."""

    split: str = "valid"
    datastore: str | None = None
    batch_size: int | None = None
    """Windows a forward pass computes (None: ``forward_batch`` of the model's context)."""
    retrieval: str = "auto"
    k_max: int = DEFAULT_K_MAX
    index: str = "auto"
    nprobe: int | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    lam: float | None = None
    k: int | None = None
    temperature: float | None = None
    force: bool = False
    max_keys: int | None = None
    refine: int | None = None
    recall_target: float = DEFAULT_RECALL
    tune_queries: int = DEFAULT_TUNE_QUERIES
    exact_sample: int = DEFAULT_EXACT_SAMPLE
    databases: tuple[str, ...] = ()
    """Retrieval databases whose text the keys are computed from instead of the train split's (``database.py``)."""

    def check(self) -> None:
        """Refuse settings that cannot be evaluated, before anything is loaded."""
        if self.split not in ("valid", "test"):
            raise ValueError(f"--knn-lm scores valid or test, not {self.split!r}: the train split is the kNN-LM "
                             f"store itself")
        if self.k_max < 1 or (self.k is not None and not 1 <= self.k <= self.k_max):
            raise ValueError(f"kNN-LM needs 1 <= k <= k_max, got k={self.k}, k_max={self.k_max}")
        if self.lam is not None and not 0.0 <= self.lam < 1.0:
            raise ValueError(f"kNN-LM lambda must be in [0, 1), got {self.lam}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"kNN-LM temperature must be positive, got {self.temperature}")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"unknown kNN-LM index {self.index!r}; pick one of {', '.join(INDEX_KINDS)}")
        if self.max_keys is not None and self.max_keys < 1:
            raise ValueError(f"--knn-max-keys must be at least 1, got {self.max_keys}")
        if not 0.0 < self.recall_target <= 1.0:
            raise ValueError(f"--knn-recall must be in (0, 1], got {self.recall_target}")
        if (self.nprobe is not None and self.nprobe < 1) or (self.refine is not None and self.refine < 1):
            raise ValueError("kNN-LM nprobe and refine must be at least 1")
        if self.memory_budget <= 0:
            raise ValueError(f"--memory-budget must be positive, got {self.memory_budget}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")


FORWARD_POSITIONS = 2048
"""Positions a forward pass of the keys and queries computes by default (8 windows of a 256-token context): the
small preset's bf16 forward made 18.8k positions/s in batches of 2,048 against 13.8k in batches of 8,192 on this
2-vCPU CPU, eager (23.7k against 18.9k compiled; bench/knnlm_forward.py): a batch that stays in cache."""


def forward_batch(context: int) -> int:
    """Windows a batch when ``--batch-size`` is not given: ``FORWARD_POSITIONS`` positions, at least one window."""
    return max(1, FORWARD_POSITIONS // context)


@dataclass
class _Run:
    """The run being evaluated and what every step reads from it."""

    run_dir: str | Path
    model: Transformer
    record: dict
    ckpt_path: Path
    store: Datastore
    dtype: str
    """The run's ``train.dtype``, which its hidden states are computed in."""
    neighbours_for: Callable[[str], NeighbourFn] | None
    """split -> the RETRO neighbours the model reads there; None for a plain LM or with retrieval off."""
    progress_factory: ProgressFactory | None

    def neighbours(self, split: str) -> NeighbourFn | None:
        return self.neighbours_for(split) if self.neighbours_for else None

    def progress(self, total: int, what: str) -> Progress | None:
        return self.progress_factory(total, what) if self.progress_factory else None


def figures(nll: float, num_tokens: int, num_bytes: int) -> dict[str, float]:
    loss = nll / max(1, num_tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": nll / math.log(2) / max(1, num_bytes)}


def _retrieval_inputs(record: dict, store: Datastore, retrieval: str, run_dir: str | Path | None = None):
    """For a retrieval run with retrieval on: a function ``split -> NeighbourFn`` giving the model the
    neighbours ``evaluate`` gives it (for a learned retriever, those of the run's last refresh in ``run_dir``;
    with ``retrieval.search.sources=train,past``, merged with the document's past), and what identifies them; for
    a plain LM (or retrieval off): None, None."""
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


def evaluate_knn_lm(run_dir: str | Path, split: str = "valid", datastore: str | None = None,
                    batch_size: int | None = None,
                    progress_factory: ProgressFactory | None = None, retrieval: str = "auto",
                    k_max: int = DEFAULT_K_MAX, index: str = "auto", nprobe: int | None = None,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET, lam: float | None = None, k: int | None = None,
                    temperature: float | None = None, force: bool = False, threads: int | None = None,
                    max_keys: int | None = None, refine: int | None = None, recall_target: float = DEFAULT_RECALL,
                    tune_queries: int = DEFAULT_TUNE_QUERIES,
                    exact_sample: int = DEFAULT_EXACT_SAMPLE,
                    databases: list[str] | None = None) -> dict[str, Any]:
    """kNN-LM figures of a run's newest checkpoint on ``split`` (valid or test), beside the LM's own on the
    same tokens. Scoring test: tuned on valid. Scoring valid: tuned on the targets of its first half
    ``valid[:half]``, scored on the second ``valid[half:]``. ``lam``, ``k`` and ``temperature``, when given,
    are fixed instead of tuned. The store in ``RUN/knnlm`` is built or reused (``force`` rebuilds it).
    ``index``: how the keys are searched (``auto``, ``exact``, ``ivf``, ``ivfpq``); ``nprobe`` lists a query and
    ``refine`` x k IVF-PQ candidates re-scored, each chosen (when None) as the fastest to reach ``recall_target``
    recall@k against exact search on ``exact_sample`` tuning queries; ``memory_budget`` bounds the index (and
    keeps the fp16 keys in memory for re-scoring when they fit beside it). ``max_keys``: the store of the first
    that many train positions. ``tune_queries``: at most that many tuning tokens (a seeded sample) are searched
    with ``k_max`` and tuned on. ``threads``: torch threads (None: the run's ``train.threads``; 0: torch's
    default).
    ``databases``: retrieval databases whose text gives the keys instead of the train split
    (``knnlm/database.py``; the hidden states are then the plain LM's, retrieval off).

    Memory: the index, the searched neighbours' distances and ids (tuning sample x k_max, scored x the tuned k);
    keys, queries and searched batches stay memory-mapped in ``RUN/knnlm``."""
    t_start = time.perf_counter()
    settings = KnnLmSettings(split, datastore, batch_size, retrieval, k_max, index, nprobe, memory_budget, lam, k,
                             temperature, force, max_keys, refine, recall_target, tune_queries, exact_sample,
                             tuple(databases or ()))
    settings.check()
    model, record, ckpt_path = load_run(run_dir)
    if settings.batch_size is None:
        settings = dataclasses.replace(settings, batch_size=forward_batch(model.config.context))
    if threads is None:
        threads = run_config(record).train.threads
    with torch_threads(threads):
        return _evaluate(run_dir, model, record, ckpt_path, settings, progress_factory, t_start)


def _evaluate(run_dir: str | Path, model: Transformer, record: dict, ckpt_path: Path, s: KnnLmSettings,
              progress_factory: ProgressFactory | None, t_start: float) -> dict[str, Any]:
    """``evaluate_knn_lm`` once the run is loaded, under its torch threads: store, queries, search, tuning."""
    store = open_run_datastore(record, s.datastore)
    dbs = None
    if s.databases:
        from knnformer.eval.knnlm.database import open_for_knn_lm

        dbs = open_for_knn_lm(list(s.databases), store, run_dir)
    nb_for, nb_identity = _retrieval_inputs(record, store, "off" if dbs else s.retrieval, run_dir)
    run = _Run(run_dir, model, record, ckpt_path, store, run_config(record).train.dtype, nb_for, progress_factory)
    seconds = {}

    t0 = time.perf_counter()
    knn_store, reused = _database_keys(run, s, dbs) if dbs else _train_keys(run, s, nb_identity)
    seconds["store"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tuning, scored, split_info = _queries(run, s, knn_store)
    if s.lam is not None and s.k is not None and s.temperature is not None:
        split_info["tuned_on"] = None  # all three given
    seconds["queries"] = time.perf_counter() - t0

    token_bytes = np.asarray(store.tokenizer.token_bytes)
    num_bytes = int(token_bytes[scored.y].sum())
    by_distance = split_info["tuned_on"] is not None and s.lam is None

    def tune_fn(tune_q: Queries, progress: Progress | None):
        return _tune(s, tune_q, knn_store.values, by_distance, progress)

    found = search_and_tune(knn_store, s, tuning, scored, tune_fn, token_bytes, run.progress_factory, seconds)
    tuned, binned, index_info, k_max = found["tuned"], found["binned"], found["index"], found["k_max"]
    t0 = time.perf_counter()
    single, logp = interpolated(tuned, binned, scored, knn_store.values)
    single = figures(float(-single.sum()), len(scored.y), num_bytes)
    seconds["scoring"] = time.perf_counter() - t0

    with_knn = figures(float(-logp.sum()), len(scored.y), num_bytes)
    lm_alone = figures(float(-np.sum(scored.logp)), len(scored.y), num_bytes)
    chunk_neighbours = None
    if dbs:
        from knnformer.eval.knnlm.database import filter_neighbours

        chunk_neighbours = filter_neighbours(dbs, store, s.split)
    _add_filtered(run, s.split, split_info["scored_targets"][0], scored, logp, token_bytes, with_knn, lm_alone,
                  chunk_neighbours)
    seconds = {key: round(value, 3) for key, value in seconds.items()}
    return {
        "split": s.split, **split_info,
        "tokens": len(scored.y), "bytes": num_bytes, **with_knn,
        "lm": lm_alone,
        "lambda": tuned["lambda"], "k": tuned["k"], "temperature": tuned["temperature"],
        "lambda_by_distance": binned,  # None: one lambda and k for every query
        "single_lambda": {key: single[key] for key in ("loss", "bits_per_byte")},
        "tuning": {key: tuned[key] for key in ("tokens", "loss", "lm_loss", "lambdas", "ks", "temperatures",
                                               "best_by_k")},
        "sample_check": found["sample_check"],
        "retrieval": "on" if nb_for else "off",
        "store": {"path": str(knn_store.path), "keys": knn_store.num_keys, "dim": knn_store.dim,
                  "bytes": knn_store.nbytes(), "reused": reused,
                  "build_seconds": knn_store.manifest.get("build_seconds")},
        "index": index_info, "k_max": k_max,
        "search_seconds": seconds["search"],
        "seconds": {**seconds, "total": round(time.perf_counter() - t_start, 3)},
        "checkpoint": str(ckpt_path), "step": int(Path(ckpt_path).name.split("-")[1]),
        **({"database": {"databases": dbs.describe(), "excluded": dbs.excluded}} if dbs else {}),
    }


def _train_keys(run: _Run, s: KnnLmSettings, nb_identity: dict | None) -> tuple[KnnStore, bool]:
    """The store of train keys, reused or built; and whether it was reused."""
    train_tokens = run.store.require_split("train", 2)
    identity = store_identity(run.record, run.ckpt_path, run.store, nb_identity, run.dtype, run.model.config.context)
    total = len(train_tokens) - 1 if s.max_keys is None else min(s.max_keys, len(train_tokens) - 1)
    progress = run.progress(total, "kNN-LM keys (train)")
    return open_or_build_store(run.run_dir, run.model, identity, train_tokens, s.batch_size, run.dtype,
                               run.neighbours("train"), progress, s.force, s.max_keys)


def _database_keys(run: _Run, s: KnnLmSettings, dbs) -> tuple[KnnStore, bool]:
    """The store of the databases' keys (``knnlm/database.py``), reused or built; and whether it was reused."""
    from knnformer.eval.knnlm.database import keys_source

    folder, identity, tokens = keys_source(dbs, run.record, run.ckpt_path, run.store, run.dtype,
                                           run.model.config.context, run.run_dir)
    progress = run.progress(len(tokens) - 1, "kNN-LM store (database keys)")
    return open_or_build_store(folder, run.model, identity, tokens, s.batch_size, run.dtype, None, progress, s.force,
                               s.max_keys)


def _split_queries(run: _Run, s: KnnLmSettings, name: str, knn_store: KnnStore) -> Queries:
    """Hidden states and LM log-probabilities of every target of the split ``name`` (memory-mapped in the store,
    reused and resumed)."""
    tokens = run.store.require_split(name, 4 if name == "valid" and s.split == "valid" else 2)
    h, logp, _, identity = open_or_build_queries(knn_store, run.model, name, tokens, knn_store.manifest["identity"],
                                                 s.batch_size, run.dtype, run.neighbours(name),
                                                 run.progress(len(tokens) - 1, f"kNN-LM queries ({name})"))
    source = {"split": name, "tokens_sha256": identity["tokens_sha256"], "rows": [0, len(tokens) - 1]}
    return Queries(h, np.asarray(logp), np.asarray(tokens[1:], dtype=np.int64), source=source)


def _queries(run: _Run, s: KnnLmSettings, knn_store: KnnStore) -> tuple[Queries, Queries, dict[str, Any]]:
    """The tuning and the scored queries, and which targets each covers (see the module's docstring)."""
    if s.split == "valid":
        valid = _split_queries(run, s, "valid", knn_store)
        n = len(valid.y)
        half = (n + 1) // 2  # targets are tokens 1 .. N - 1; rows below half - 1 tune
        rows = slice(0, half - 1), slice(half - 1, n)
        tuning, scored = (Queries(valid.h[r], valid.logp[r], valid.y[r],
                                  source={**valid.source, "rows": [r.start, r.stop]}) for r in rows)
        return tuning, scored, {"tuned_on": "valid[:half]", "scored": "valid[half:]", "half": half,
                                "tuned_targets": [1, half], "scored_targets": [half, n + 1]}
    tuning, scored = _split_queries(run, s, "valid", knn_store), _split_queries(run, s, s.split, knn_store)
    return tuning, scored, {"tuned_on": "valid", "scored": s.split,
                            "tuned_targets": [1, len(tuning.y) + 1], "scored_targets": [1, len(scored.y) + 1]}


def _tune(s: KnnLmSettings, tuning: Queries, values: np.ndarray, by_distance: bool,
          progress: Progress | None = None) -> tuple[dict, dict | None]:
    """Tune on ``tuning`` (what ``s`` fixes stays fixed). With ``by_distance`` and at least two bins of tuning
    queries, lambda and k are tuned again per nearest-distance bin. Returns the tuning and the bins (None when
    not binned)."""
    ks = [s.k] if s.k is not None else None
    temperatures = [s.temperature] if s.temperature is not None else None
    lambdas = [s.lam] if s.lam is not None else LAMBDAS
    tuned = tune(tuning.logp, tuning.distances(), tuning.matches(values), lambdas, ks, temperatures, progress)
    bins = min(LAMBDA_BINS, len(tuning.y) // 1000) if by_distance else 1
    if bins <= 1:
        return tuned, None
    return tuned, tune_by_distance(tuning.logp, tuning.distances(), tuning.matches(values), tuned, lambdas, bins)


def _add_filtered(run: _Run, split: str, first: int, scored: Queries, logp: torch.Tensor, token_bytes: np.ndarray,
                  with_knn: dict, lm_alone: dict, chunk_neighbours=None) -> None:
    """RETRO's overlap-filtered figures, with the chunks bucketed by the datastore's chunk neighbours (as evaluate
    buckets a plain LM), so a kNN-LM gain can be read beside the part of it that is copying; nothing without
    chunk neighbours (or ``chunk_neighbours``, a retrieval database's). ``first``: the first scored target."""
    if chunk_neighbours is None:
        chunk_neighbours = run_neighbours(run.record, run.store, required=False, run_dir=run.run_dir)
    if chunk_neighbours is None:
        return
    rcfg = run_retrieval(run.record)
    kk = min((rcfg.eval_neighbours or rcfg.num_neighbours) if rcfg.enabled else 2, chunk_neighbours.k)
    overlaps = split_overlaps(chunk_neighbours, run.store.require_split(split, 2), split, kk, rcfg.continuation)
    with_knn["filtered"] = filtered_figures(-logp.numpy(), scored.y, token_bytes, overlaps,
                                            chunk_neighbours.chunk_size, first)
    lm_alone["filtered"] = filtered_figures(-np.asarray(scored.logp), scored.y, token_bytes, overlaps,
                                            chunk_neighbours.chunk_size, first)


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
            ("kNN-LM search", f"{r['index']['kind']}, recall@{r['k']} {r['index']['recall_at_k']:.3f}"
                              + (f" (nprobe {r['index']['nprobe']}" + (f", refine {r['index']['refine']}"
                                 if r['index'].get('refine') else "") + ")" if r['index'].get('nprobe') else "")
                              + f", {r['search_seconds']:.1f}s; {r['seconds']['total']:.1f}s in all"),
            *([("kNN-LM vs exact search", f"gain {r['sample_check']['gain_bits_per_byte']:.4f} vs exact "
                                          f"{r['sample_check']['exact_gain_bits_per_byte']:.4f} bits/byte on "
                                          f"{r['sample_check']['queries']:,} tuning tokens")]
              if r.get("sample_check") else [])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
