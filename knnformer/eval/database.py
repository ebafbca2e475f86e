"""Scoring a run with retrieval databases (``evaluate RUN --retrieval-db DB... --mode M``): three ways to read
text the run was not trained on, each beside retrieval off on the same tokens, with RETRO's overlap-filtered
figures (chunks bucketed by the neighbours the database serves them) and the leakage filter's count.

- ``cca``: a RETRO run's chunked cross-attention reads the databases' neighbours (``evaluate_run``).
- ``knn-lm``: any run, interpolated with a kNN-LM whose keys are the databases' text (``knnlm``).
- ``in-context``: any run, the neighbours' text placed before the window (``incontext.py``).

``evaluate_database`` returns one shape of result for the three: ``bits_per_byte`` and ``filtered`` with the
databases, ``retrieval_off`` the same without, ``gain`` (relative, positive = fewer bits), ``database`` (what
was searched and what the filter excluded) and the mode's own details under ``details``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from knnformer.eval.evaluate import summarize
from knnformer.eval.overlap import ALPHAS, chunk_overlaps, filtered_figures
from knnformer.eval.scoring import score_tokens
from knnformer.run.record import load_run, open_run_datastore, run_config

MODES = ("cca", "knn-lm", "in-context")


def evaluate_database(run_dir: str | Path, databases: list[str], mode: str, split: str = "valid",
                      datastore: str | None = None, batch_size: int = 32, progress_factory=None,
                      neighbours: int = 1, stride: int | None = None) -> dict[str, Any]:
    """Score ``split`` of the run's datastore (or ``datastore``) reading ``databases`` in ``mode``, beside
    retrieval off (``mode`` ``auto``: cca for a RETRO run, else knn-lm). ``neighbours`` and ``stride``: for ``in-context``, how many neighbours are placed in context
    and how many tokens each retrieval serves (default: the chunk size)."""
    if mode == "auto":
        from knnformer.run.record import run_retrieval

        mode = "cca" if run_retrieval(load_run(run_dir)[1]).enabled else "knn-lm"
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    t0 = time.perf_counter()
    if mode == "cca":
        from knnformer.eval.evaluate import evaluate_run

        r = evaluate_run(run_dir, split, None, datastore, batch_size, progress_factory, "on", 0, databases=databases)
        out = {"bits_per_byte": r["bits_per_byte"], "loss": r["loss"], "filtered": r.get("filtered"),
               "retrieval_off": r["retrieval_off"], "database": r["database"], "scored": split,
               "tokens": r["tokens"], "details": {"neighbours": r.get("neighbours"), "step": r.get("step")}}
    elif mode == "knn-lm":
        if stride:
            raise ValueError("--mode knn-lm scores in consecutive windows; drop --stride")
        from knnformer.eval.knnlm import evaluate_knn_lm

        r = evaluate_knn_lm(run_dir, split, datastore, batch_size, progress_factory, databases=databases)
        out = {"bits_per_byte": r["bits_per_byte"], "loss": r["loss"], "filtered": r.get("filtered"),
               "retrieval_off": r["lm"], "database": r["database"], "scored": r["scored"], "tokens": r["tokens"],
               "details": {key: r[key] for key in ("tuned_on", "lambda", "k", "temperature", "store", "index",
                                                   "seconds", "single_lambda")}}
    else:
        out = evaluate_in_context(run_dir, databases, split, datastore, batch_size, progress_factory, neighbours,
                                  stride)
    out.update({"mode": mode, "split": split,
                "gain": 1 - out["bits_per_byte"] / out["retrieval_off"]["bits_per_byte"],
                "seconds": round(time.perf_counter() - t0, 3)})
    return out


def evaluate_in_context(run_dir: str | Path, databases: list[str], split: str, datastore: str | None,
                        batch_size: int, progress_factory, k: int, stride: int | None) -> dict[str, Any]:
    """In-context retrieval from ``databases`` (``incontext.py``), and retrieval off over sliding windows of the
    full context at the same stride; both bucketed by the overlap of each chunk with the neighbours in its
    window."""
    from knnformer.eval.incontext import block_query, score_in_context
    from knnformer.retrieval.database import database_neighbours, open_databases
    from knnformer.retrieval.neighbours import in_context_prefix as prefix_tokens

    if k < 1:
        raise ValueError(f"--neighbours must be at least 1, got {k}")
    model, record, ckpt_path = load_run(run_dir)
    store = open_run_datastore(record, datastore)
    dbs = open_databases(databases, store.manifest["tokenizer"]["fingerprint"], None, f"run {run_dir}")
    tokens = store.require_split(split, 2)
    bar = progress_factory(-(-len(tokens) // dbs.chunk_size), "searching the databases") if progress_factory else None
    t0 = time.perf_counter()
    nb = database_neighbours(dbs, store, (split,), k, progress=bar)
    search_s = time.perf_counter() - t0
    C, T = dbs.chunk_size, model.config.context
    stride = stride or C
    if 2 * C * k + stride > T:
        raise ValueError(f"{k} neighbours of {2 * C} tokens and a stride of {stride} do not fit the context {T}; "
                         f"use fewer --neighbours or a smaller --stride")
    lo = nb.layout.split_chunks[split][0]

    def batch(q: np.ndarray):
        return nb.for_chunks(np.where(q >= 0, lo + q, -1), k)

    def prefix(q: np.ndarray) -> list[np.ndarray]:
        got = batch(q)
        return prefix_tokens(got.tokens, got.mask, k)

    def served_by(prev: np.ndarray):  # chunk j = prev + 1 is read in the block of its first token
        j = prev + 1
        q = np.array([block_query(int(c) * C // stride * stride, C) for c in j])
        got = batch(q)
        return got.tokens, got.mask

    dtype = run_config(record).train.dtype
    token_bytes = store.tokenizer.token_bytes
    overlaps = chunk_overlaps(np.asarray(tokens), C, served_by)
    targets = np.asarray(tokens[1:], dtype=np.int64)
    t1 = time.perf_counter()
    on = score_in_context(model, tokens, token_bytes, C, prefix, stride, batch_size, dtype,
                          progress_factory(len(tokens) - 1, "in-context") if progress_factory else None, True)
    on_s = time.perf_counter() - t1
    off = score_tokens(model, tokens, token_bytes, stride, batch_size, dtype,
                       progress_factory(len(tokens) - 1, "retrieval off") if progress_factory else None, None, True)
    with_db = summarize(on, split, stride, T)
    without = summarize(off, split, stride, T)
    return {"bits_per_byte": with_db["bits_per_byte"], "loss": with_db["loss"], "scored": split,
            "tokens": with_db["tokens"],
            "filtered": filtered_figures(on["losses"], targets, token_bytes, overlaps, C),
            "retrieval_off": {"bits_per_byte": without["bits_per_byte"], "loss": without["loss"],
                              "windows": f"sliding, context {T}, stride {stride}",
                              "filtered": filtered_figures(off["losses"], targets, token_bytes, overlaps, C)},
            "database": {key: nb.info[key] for key in ("databases", "excluded")},
            "details": {"neighbours": k, "stride": stride, "mean_prefix_tokens": round(on["mean_prefix_tokens"], 1),
                        "search_seconds": round(search_s, 3), "score_seconds": round(on_s, 3),
                        "seconds_per_1000_tokens": round(1000 * (search_s + on_s) / max(1, on["tokens"]), 4),
                        "step": int(Path(ckpt_path).name.split("-")[1])}}


def format_table(result: dict[str, Any]) -> str:
    """The summary a newcomer reads: retrieval off, with the databases, and the alpha-0.125 figures."""
    db = result["database"]
    off = result["retrieval_off"]
    ex = db["excluded"]
    rows = [("mode", result["mode"]), ("scored", f"{result['scored']} ({result['tokens']:,} tokens)"),
            ("databases", "; ".join(f"{d['path']} ({d['chunks']:,} chunks, {d['embedder']})" for d in db["databases"])),
            ("leakage filter", (f"excluded {ex.get('documents', 0):,} database documents "
                                f"({ex.get('chunks', 0):,} chunks) that copy held-out documents")),
            ("bits per byte, retrieval off", f"{off['bits_per_byte']:.4f}"),
            ("bits per byte, with the databases", f"{result['bits_per_byte']:.4f} ({-100 * result['gain']:+.1f}%)")]
    for alpha in (str(a) for a in ALPHAS[:1]):
        fig, base = (result.get("filtered") or {}).get(alpha), (off.get("filtered") or {}).get(alpha)
        if fig and base:
            rows.append((f"overlap <= {alpha}: off / with",
                         (f"{base['bits_per_byte']:.4f} / {fig['bits_per_byte']:.4f} "
                          f"({100 * (fig['bits_per_byte'] / base['bits_per_byte'] - 1):+.1f}%, "
                          f"{fig['fraction']:.0%} of chunks)")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
