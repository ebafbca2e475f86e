"""Scoring a whole split: loss, perplexity and bits per UTF-8 byte, every token after the first scored once.

With ``stride == context`` (the default) the split is cut into consecutive windows of the model's context, the
exhaustive form of nanoGPT's estimate. With a smaller stride, windows overlap and each scores only the tokens
the previous windows did not, so every token is predicted from at least ``context - stride`` tokens of history.

A retrieval model is scored with retrieval on and again off; with neighbours in the datastore come RETRO's
overlap-filtered figures (``overlap``), what each served neighbour was worth (``gain``) and the gain of the second
hop. kNN-LM's evaluation is ``knnformer.eval.knnlm``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from knnformer.eval.gain import DEFAULT_GAIN_WINDOWS, neighbour_gain
from knnformer.eval.overlap import filtered_figures, split_overlaps
from knnformer.eval.scoring import NeighbourFn, neighbour_fn_for, score_tokens
from knnformer.model.moe import StatsMeter
from knnformer.run.record import load_run, open_run_datastore, run_config, run_derived, run_neighbours, run_retrieval


def summarize(total: dict[str, Any], split: str, stride: int, context: int) -> dict[str, Any]:
    loss = total["nll"] / max(1, total["tokens"])
    return {
        "split": split,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": total["nll"] / math.log(2) / max(1, total["bytes"]),
        "tokens": total["tokens"],
        "bytes": total["bytes"],
        "stride": stride,
        "context": context,
        "windows": "consecutive" if stride == context else "sliding",
    }


def evaluate_run(run_dir: str | Path, split: str = "valid", stride: int | None = None, datastore: str | None = None,
                 batch_size: int = 32, progress_factory=None, retrieval: str = "auto",
                 gain_windows: int = DEFAULT_GAIN_WINDOWS, device: str = "cpu",
                 databases: list[str] | None = None) -> dict[str, Any]:
    """Score a split. ``retrieval``: ``on`` (the run must be a retrieval model), ``off`` (run as a plain LM) or
    ``auto`` (on for a retrieval run). With retrieval on, the figures with retrieval off come along, and with
    any neighbours in the datastore, RETRO's overlap-filtered bits per byte. With retrieval on and
    ``gain_windows`` > 0, ``neighbour_gain`` says what each served neighbour was worth (see ``neighbour_gain``);
    for a run with a learned retriever, ``refreshes`` lists each refresh's index recall. With ``databases``
    (paths of retrieval databases, ``retrieval/database.py``) a RETRO run reads its neighbours from them instead
    of its own datastore (RETRO's cross-attention over text it was not trained on), leakage-filtered."""
    from knnformer.run.vectors import frozen_vectors

    model, record, ckpt_path = load_run(run_dir, device)
    store = open_run_datastore(record, datastore)
    rcfg = run_retrieval(record)
    if retrieval not in ("auto", "on", "off"):
        raise ValueError(f"--retrieval must be on or off, got {retrieval!r}")
    if retrieval == "on" and not rcfg.enabled:
        raise ValueError(f"{run_dir} was trained without retrieval; train with --set retrieval.enabled=true, or "
                         f"evaluate with --retrieval off")
    use_retrieval = rcfg.enabled and retrieval != "off"
    context = model.config.context
    tokens = store.require_split(split, 2)
    stride = stride or context
    if not databases and rcfg.enabled and use_retrieval and rcfg.search.databases:
        databases = rcfg.search.databases.split(",")  # the databases the run trained against
    if databases:
        neighbours = cca_database_neighbours(record, store, databases, split, use_retrieval, run_dir)
    else:
        neighbours = run_neighbours(record, store, required=use_retrieval, run_dir=run_dir)
    k = (rcfg.eval_neighbours or rcfg.num_neighbours) if rcfg.enabled else min(2, neighbours.k if neighbours else 2)
    continuation = rcfg.continuation
    past = rcfg.enabled and "past" in rcfg.search.sources
    if use_retrieval and stride % neighbours.chunk_size:
        raise ValueError(f"--stride must be a multiple of the chunk size {neighbours.chunk_size} with retrieval on")
    dtype = run_config(record).train.dtype
    token_bytes = store.tokenizer.token_bytes

    frozen = frozen_vectors(store, rcfg, run_derived(record).retriever_input_dim) if use_retrieval else None

    def neighbour_fn(chosen) -> NeighbourFn:
        return neighbour_fn_for(chosen, split, k, continuation, past, frozen)

    nb_fn = neighbour_fn(neighbours)

    passes = [("on", nb_fn), ("off", None)] if use_retrieval else [("off", None)]
    overlaps = None if neighbours is None else split_overlaps(neighbours, tokens, split, k, continuation)
    result: dict[str, Any] = {}
    meter = StatsMeter(model)
    for name, fn in passes:
        progress = progress_factory(len(tokens) - 1, f"retrieval {name}") if progress_factory else None
        meter.reset()
        total = score_tokens(model, tokens, token_bytes, stride, batch_size, dtype, progress, fn,
                             per_token=overlaps is not None)
        figures = summarize(total, split, stride, context)
        if overlaps is not None:
            figures["filtered"] = filtered_figures(total["losses"], np.asarray(tokens[1:], dtype=np.int64),
                                                   token_bytes, overlaps, neighbours.chunk_size)
        figures["retrieval"] = name
        if meter.layers:
            figures["moe"] = meter.summary()
        if not result:
            result = figures
        else:
            result["retrieval_off"] = {key: figures[key] for key in ("loss", "bits_per_byte", "filtered")
                                       if key in figures}
    meter.close()
    if use_retrieval and not databases:
        hop = second_hop(model, record, store, run_dir, tokens, split, stride, batch_size, neighbour_fn,
                         result["bits_per_byte"])
        if hop is not None:
            result["second_hop"] = hop
    if use_retrieval and gain_windows > 0:
        result["neighbour_gain"] = {"embedder": neighbours.info["embedder"],
                                    **neighbour_gain(model, tokens, nb_fn, gain_windows, dtype, batch_size)}
    refresh = record.get("refresh") or {}
    if refresh.get("id"):
        from knnformer.run.refreshes import refresh_history

        result["refreshes"] = refresh_history(run_dir, refresh["id"])
    result["checkpoint"] = str(ckpt_path)
    result["step"] = int(Path(ckpt_path).name.split("-")[1])
    if neighbours is not None:
        result["neighbours"] = {"embedder": neighbours.info["embedder"], "k": k, "chunk_size": neighbours.chunk_size}
    if databases:
        result["database"] = {key: neighbours.info[key] for key in ("databases", "excluded")}
    return result


def cca_database_neighbours(record: dict, store, databases: list[str], split: str, use_retrieval: bool,
                            run_dir: str | Path):
    """The neighbours a RETRO run reads from retrieval ``databases`` for every chunk of ``split`` (refused, with
    the reason, for a plain LM, with retrieval off, or for what a database cannot serve)."""
    from knnformer.retrieval.database import database_neighbours, open_databases

    rcfg = run_retrieval(record)
    if not use_retrieval:
        raise ValueError(f"--mode cca reads the databases through RETRO's cross-attention, and {run_dir} "
                         f"{'evaluates with --retrieval off' if rcfg.enabled else 'was trained without retrieval'}; "
                         f"use --mode knn-lm or --mode in-context")
    if rcfg.retriever.kind == "learned" or "past" in rcfg.search.sources or rcfg.search.hops != 1:
        raise ValueError("--retrieval-db reads a database through the frozen embedder it was indexed with: one hop, "
                         "train sources, no learned retriever; this run was trained otherwise")
    dbs = open_databases(databases, store.manifest["tokenizer"]["fingerprint"], rcfg.chunk_size, f"run {run_dir}")
    return database_neighbours(dbs, store, (split,), rcfg.eval_neighbours or rcfg.num_neighbours)


def second_hop(model, record: dict, store, run_dir: str | Path, tokens: np.ndarray, split: str, stride: int,
               batch_size: int, neighbour_fn: Callable[[Any], NeighbourFn], bits_per_byte: float) -> dict | None:
    """The gain of the second hop: the run scored with the other hop's neighbours (``neighbour_fn(neighbours)``
    serves them) beside ``bits_per_byte``, its figure with the hop it trained on. None when the datastore (or
    refresh) holds one hop only."""
    hops = run_retrieval(record).search.hops
    try:
        other = run_neighbours(record, store, True, run_dir, hops=3 - hops)
    except ValueError:
        return None  # the datastore (or refresh) holds one hop only
    if other is None:
        return None
    dtype = run_config(record).train.dtype
    total = score_tokens(model, tokens, store.tokenizer.token_bytes, stride, batch_size, dtype, None,
                         neighbour_fn(other))
    bpb = {hops: bits_per_byte, 3 - hops: summarize(total, split, stride, model.config.context)["bits_per_byte"]}
    return {
        "trained_with_hops": hops, "bits_per_byte_hop1": bpb[1], "bits_per_byte_hop2": bpb[2],
        "gain": bpb[1] - bpb[2],
        "sign": "bits per byte with hop-1 neighbours minus with hop-2 neighbours: positive = the second "
                "hop helped",
        **({"note": "this run trained on hop-1 neighbours; it reads hop-2 neighbours at evaluation only"}
           if hops == 1 else {})}


def format_table(result: dict[str, Any]) -> str:
    rows = [("split", result["split"]), ("checkpoint step", result.get("step", "")),
            ("windows", f"{result['windows']} (context {result['context']}, stride {result['stride']})"),
            ("tokens scored", f"{result['tokens']:,}"), ("bytes", f"{result['bytes']:,}"),
            ("loss (nats/token)", f"{result['loss']:.4f}"), ("perplexity", f"{result['perplexity']:.3f}"),
            ("bits per byte", f"{result['bits_per_byte']:.4f}")]
    rows.append(("retrieval", result.get("retrieval", "off")))
    if "retrieval_off" in result:
        rows.append(("bits per byte, retrieval off", f"{result['retrieval_off']['bits_per_byte']:.4f}"))
    for alpha, fig in result.get("filtered", {}).items():
        off = result.get("retrieval_off", {}).get("filtered", {}).get(alpha)
        rows.append((f"bits per byte, overlap <= {alpha}",
                     f"{fig['bits_per_byte']:.4f} ({fig['fraction']:.1%} of chunks)"
                     + (f"; retrieval off {off['bits_per_byte']:.4f}" if off else "")))
    gain = result.get("neighbour_gain")
    if gain and gain["pairs"]:
        rows.append((f"gain per neighbour ({gain['embedder']})",
                     f"{gain['mean_nats_per_token']:+.4f} nats/token, {gain['share_helped']:.1%} helped "
                     f"({gain['pairs']:,} neighbours in {gain['windows']} windows; + = lowered the loss)"))
    hop = result.get("second_hop")
    if hop:
        rows.append(("gain of the second hop", f"{hop['gain']:+.4f} bits/byte (hop 1 {hop['bits_per_byte_hop1']:.4f}, "
                                               f"hop 2 {hop['bits_per_byte_hop2']:.4f}; trained with "
                                               f"{hop['trained_with_hops']} hop{'s' if hop['trained_with_hops'] > 1 else ''})"))
    for row in result.get("refreshes", []):
        rows.append((f"refresh {row['refresh']} (step {row['step']})",
                     f"{row['index_kind']} index recall@10 {row['recall_at_10']:.4f}"))
    for layer in result.get("moe", []):
        load = layer["load"]
        rows.append((f"MoE layer {layer['layer']}", f"dropped {layer['dropped']:.2%}, balance loss "
                     f"{layer['balance_loss']:.4f}, z-loss {layer['z_loss']:.3f}, expert load "
                     f"{min(load):.3f}-{max(load):.3f} (uniform {1 / len(load):.3f})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)
