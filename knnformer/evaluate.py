"""Scoring a whole split: loss, perplexity and bits per UTF-8 byte, every token after the first scored once.

With ``stride == context`` (the default) the split is cut into consecutive windows of the model's context, the
exhaustive form of nanoGPT's estimate. With a smaller stride, windows overlap and each scores only the tokens
the previous windows did not, so every token is predicted from at least ``context - stride`` tokens of history.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from knnformer.checkpoint import latest_checkpoint, load_checkpoint
from knnformer.config import config_from_dict
from knnformer.datastore import Datastore
from knnformer.model import Transformer
from knnformer.moe import StatsMeter
from knnformer.trainer import autocast


def window_plan(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows as (begin, first scored target offset, number of targets). Window inputs are
    ``tokens[begin : begin + n]`` and its targets ``tokens[begin + 1 : begin + 1 + n]``; target positions
    ``1 .. num_tokens - 1`` are each scored by exactly one window."""
    if not 0 < stride <= context:
        raise ValueError(f"--stride must be between 1 and the context ({context}), got {stride}")
    plan, scored_upto, begin = [], 1, 0
    while scored_upto < num_tokens:
        n = min(context, num_tokens - 1 - begin)
        plan.append((begin, scored_upto - (begin + 1), n))
        scored_upto = begin + 1 + n
        begin += stride
    return plan


NeighbourFn = Callable[[np.ndarray, int], tuple]
"""``neighbours(begins, length)``: neighbour tokens and mask (B, S, K, R) for windows of ``length`` tokens
starting at split-relative ``begins``, and for a learned retriever reading the frozen embedder a third item,
its ``retrieval_vectors`` (``batches.relevance_vectors``)."""


def neighbour_model_inputs(out: tuple, device, rows: int | None = None) -> dict:
    """The model's keyword inputs from a ``NeighbourFn``'s result, on ``device``; with ``rows``, a batch of one
    window repeated ``rows`` times (the mask is the caller's)."""
    nb, mask, *rest = out
    grow = (lambda t: t.expand(rows, *t.shape[1:])) if rows else (lambda t: t)  # noqa: E731
    inputs = {"neighbours": grow(nb).to(device), "neighbour_mask": mask.to(device)}
    if rest and rest[0] is not None:
        inputs["retrieval_vectors"] = tuple(grow(v).to(device) for v in rest[0])
    return inputs


def neighbour_fn_for(neighbours, split: str, k: int, continuation: bool, past: bool,
                     frozen: np.ndarray | None = None) -> NeighbourFn:
    """The ``NeighbourFn`` serving ``neighbours`` (a ``Neighbours``) as training served them: ``k`` per slot,
    with their continuation, merged with the document's past, and with ``frozen`` (the frozen embedder's
    vectors, for a learned retriever reading them) the retrieval vectors."""
    from knnformer.batches import neighbour_inputs, relevance_vectors

    def fn(begins: np.ndarray, length: int):
        nb, mask, ids = neighbour_inputs(neighbours, split, begins, length, k, continuation, past)
        if frozen is None:
            return nb, mask
        return nb, mask, relevance_vectors(frozen, neighbours, split, begins, length, ids)

    return fn


def window_batches(tokens: np.ndarray, plan: list[tuple[int, int, int]], batch_size: int,
                   neighbours: NeighbourFn | None, device):
    """The windows of ``plan`` in batches of up to ``batch_size`` windows of equal length (only the last one or
    few are shorter): yields (group, n, x (B, n) on ``device``, y (B, n) on the CPU, the model's neighbour
    inputs)."""
    i = 0
    while i < len(plan):
        n = plan[i][2]
        group = [plan[i]]
        while i + len(group) < len(plan) and len(group) < batch_size and plan[i + len(group)][2] == n:
            group.append(plan[i + len(group)])
        rows = np.stack([tokens[b : b + n + 1] for b, _, _ in group]).astype(np.int64)
        inputs = {}
        if neighbours is not None:
            inputs = neighbour_model_inputs(neighbours(np.array([g[0] for g in group]), n), device)
        yield group, n, torch.from_numpy(rows[:, :-1]).to(device), torch.from_numpy(rows[:, 1:]), inputs
        i += len(group)


@torch.no_grad()
def score_tokens(model: Transformer, tokens: np.ndarray, token_bytes: np.ndarray, stride: int | None = None,
                 batch_size: int = 32, dtype: str = "float32", progress: Callable[[int], None] | None = None,
                 neighbours: NeighbourFn | None = None, per_token: bool = False) -> dict[str, Any]:
    """Total negative log-likelihood of ``tokens[1:]`` given what precedes each, in windows of the context.
    With ``neighbours`` the model retrieves; with ``per_token`` the result also holds ``losses``, the NLL of
    every target position (index p - 1 for token p)."""
    context = model.config.context
    stride = stride or context
    model.eval()
    device = next(model.parameters()).device
    plan = window_plan(len(tokens), context, stride)
    nll, num_tokens, num_bytes = 0.0, 0, 0
    losses_out = np.zeros(max(0, len(tokens) - 1), dtype=np.float32) if per_token else None
    token_bytes = torch.from_numpy(np.asarray(token_bytes))
    for group, n, x, y, inputs in window_batches(tokens, plan, batch_size, neighbours, device):
        with autocast(dtype, device):
            logits, _ = model(x, **inputs)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
        losses = losses.view(len(group), n).cpu().double()
        for row, (begin, first, _) in enumerate(group):
            nll += float(losses[row, first:].sum())
            if losses_out is not None:
                losses_out[begin + first : begin + n] = losses[row, first:].numpy()
            num_tokens += n - first
            num_bytes += int(token_bytes[y[row, first:]].sum())
        if progress is not None:
            progress(sum(g[2] - g[1] for g in group))
    out = {"nll": nll, "tokens": num_tokens, "bytes": num_bytes}
    if losses_out is not None:
        out["losses"] = losses_out
    return out


ALPHAS = (0.125, 0.25, 0.5, 1.0)


def longest_shared_run(chunks: np.ndarray, neighbours: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """For each row, the longest run of consecutive tokens of ``chunks`` (N, C) that also occurs, in order, in
    one of its neighbours (N, K, R) (positions where ``mask`` is False never match). Returns (N,) ints."""
    N, C = chunks.shape
    run = np.zeros(neighbours.shape, dtype=np.int32)
    best = np.zeros(N, dtype=np.int32)
    for i in range(C):
        match = (neighbours == chunks[:, i, None, None]) & mask
        shifted = np.zeros_like(run)
        shifted[..., 1:] = run[..., :-1]
        run = np.where(match, shifted + 1, 0)
        best = np.maximum(best, run.max(axis=(1, 2)) if run.size else 0)
    return best


def chunk_overlaps(tokens: np.ndarray, chunk_size: int, neighbour_fn) -> np.ndarray:
    """RETRO's overlap ratio r of every chunk of a split: the longest run it shares with the neighbours that
    serve its tokens (those retrieved by the chunk before it), over C. ``neighbour_fn(prev_chunk_index)``
    returns neighbour tokens and mask (N, K, R) for split-relative chunk indices (-1 = none)."""
    C = chunk_size
    num_chunks = -(-len(tokens) // C)
    r = np.zeros(num_chunks, dtype=np.float32)
    for lo in range(0, num_chunks, 4096):
        idx = np.arange(lo, min(num_chunks, lo + 4096))
        chunk = np.zeros((len(idx), C), dtype=np.int64)
        valid = np.zeros((len(idx), C), dtype=bool)
        for j in range(C):
            pos = idx * C + j
            ok = pos < len(tokens)
            chunk[ok, j] = tokens[pos[ok]]
            valid[:, j] = ok
        nb, mask = neighbour_fn(idx - 1)
        chunk = np.where(valid, chunk, -1)  # padding never matches
        r[idx] = longest_shared_run(chunk, nb, mask) / C
    return r


def split_overlaps(neighbours, tokens: np.ndarray, split: str, k: int, continuation: bool) -> np.ndarray:
    """``chunk_overlaps`` of a split against the neighbours that serve each of its chunks in the datastore."""
    lo_chunk = neighbours.layout.split_chunks[split][0]
    C = neighbours.chunk_size
    R = 2 * C if continuation else C

    def prev_fn(prev):
        nb = neighbours.for_chunks(np.where(prev >= 0, lo_chunk + prev, -1), k)
        return nb.tokens[..., :R], nb.mask[..., :R]

    return chunk_overlaps(np.asarray(tokens), C, prev_fn)


def filtered_figures(losses: np.ndarray, targets: np.ndarray, token_bytes: np.ndarray, overlaps: np.ndarray,
                     chunk_size: int, first: int = 1) -> dict[str, dict[str, float]]:
    """Bits per byte over the chunks whose overlap ratio is at most alpha, and the share of chunks kept.
    ``losses[i]`` and ``targets[i]`` belong to token p = first + i of the split, which lies in chunk p // C."""
    chunk_of_target = (np.arange(len(losses)) + first) // chunk_size
    r = overlaps[chunk_of_target]
    nbytes = np.asarray(token_bytes)[targets]
    scored_chunks = np.unique(chunk_of_target)
    out = {}
    for alpha in ALPHAS:
        keep = r <= alpha + 1e-9
        b = int(nbytes[keep].sum())
        out[str(alpha)] = {
            "bits_per_byte": float(losses[keep].astype(np.float64).sum() / math.log(2) / b) if b else float("nan"),
            "fraction": float((overlaps[scored_chunks] <= alpha + 1e-9).mean()) if len(scored_chunks) else 0.0,
        }
    return out


# ---------------------------------------------------------------- what each neighbour was worth

def served_positions(slot: int, chunk_size: int, length: int) -> tuple[int, int]:
    """The half-open range of window positions that neighbour slot ``slot`` serves (retro.py: slot s serves
    positions s*C - 1 .. s*C + C - 2), clipped to a window of ``length`` tokens; empty when it serves none."""
    lo, hi = min(length, max(0, slot * chunk_size - 1)), min(length, slot * chunk_size + chunk_size - 1)
    return lo, max(lo, hi)


def pair_gains(base: np.ndarray, masked: np.ndarray, slots: np.ndarray, chunk_size: int) -> np.ndarray:
    """The gain of each (slot, neighbour) pair of one window: the mean loss over the positions its slot serves
    with that neighbour masked out (``masked`` (P, n), one row per pair) minus the mean loss there with every
    neighbour (``base`` (n,)). Positive: the neighbour lowered the loss of the chunk it served."""
    out = np.empty(len(slots), dtype=np.float64)
    for i, s in enumerate(slots):
        lo, hi = served_positions(int(s), chunk_size, len(base))
        out[i] = masked[i, lo:hi].astype(np.float64).mean() - base[lo:hi].astype(np.float64).mean()
    return out


@torch.no_grad()
def neighbour_gain(model: Transformer, tokens: np.ndarray, neighbours: NeighbourFn, num_windows: int,
                   dtype: str = "float32", batch_size: int = 32) -> dict[str, Any]:
    """How much each served neighbour lowered the loss of the chunk it served, on ``num_windows`` consecutive
    full windows spread evenly over ``tokens`` (each costs one forward per served neighbour, so the sample is
    bounded). A pair is (slot, neighbour) with at least one real token; its gain is ``pair_gains``': loss in
    nats per token over the slot's served positions without that one neighbour minus with all of them
    (positive = it helped). Only the served positions count: a neighbour's later effect through self-attention
    over those positions is left out. Returns the mean gain over pairs, the share with gain > 0, and counts."""
    context, C = model.config.context, model.retrieval.chunk_size
    model.eval()
    device = next(model.parameters()).device
    num_full = (len(tokens) - 1) // context
    chosen = np.unique(np.linspace(0, num_full - 1, min(num_windows, num_full)).round().astype(np.int64))
    gains = []
    for begin in chosen * context:
        rows = torch.from_numpy(np.asarray(tokens[begin : begin + context + 1]).astype(np.int64))[None]
        x, y = rows[:, :-1], rows[:, 1:]
        served = neighbours(np.array([begin]), context)  # tokens and mask (1, S, K, R)
        mask = served[1]
        S, K = mask.shape[1:3]
        serving = [s for s in range(S) if len(range(*served_positions(s, C, context)))]
        pairs = [(s, j) for s in serving for j in range(K) if bool(mask[0, s, j].any())]
        masks = mask.repeat(1 + len(pairs), 1, 1, 1)
        for i, (s, j) in enumerate(pairs):
            masks[1 + i, s, j] = False
        losses = []
        for b in range(0, len(masks), batch_size):
            m = masks[b : b + batch_size]
            inputs = {**neighbour_model_inputs(served, device, len(m)), "neighbour_mask": m.to(device)}
            with autocast(dtype, device):
                logits, _ = model(x.expand(len(m), -1).to(device), **inputs)
            losses.append(F.cross_entropy(logits.float().transpose(1, 2), y.expand(len(m), -1).to(device),
                                          reduction="none").cpu().numpy())
        losses = np.concatenate(losses)
        gains.append(pair_gains(losses[0], losses[1:], np.array([s for s, _ in pairs], dtype=np.int64), C))
    gains = np.concatenate(gains) if gains else np.zeros(0)
    return {"mean_nats_per_token": float(gains.mean()) if len(gains) else float("nan"),
            "share_helped": float((gains > 0).mean()) if len(gains) else float("nan"),
            "pairs": int(len(gains)), "windows": int(len(chosen)),
            "sign": "loss without the neighbour minus loss with it, over the positions it serves: "
                    "positive = the neighbour lowered the loss"}


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


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[Transformer, dict[str, Any], Path]:
    """The model of a run's newest checkpoint, its run record and the checkpoint path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    record = ckpt["config"]
    config = config_from_dict(record["config"])
    record["config"] = config.to_dict()  # with every default, for runs saved before a section existed
    model = Transformer(config.model, config.retrieval)
    try:
        model.load_state_dict(ckpt["weights"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {ckpt['path']} does not fit its own config ({str(e)[:200]})") from None
    return model.to(device).eval(), record, ckpt["path"]


def open_run_datastore(record: dict[str, Any], override: str | None = None) -> Datastore:
    """The datastore a run was trained on (or ``override``), refused if its tokenizer differs from the run's."""
    path = override or record["datastore"]["path"]
    datastore = Datastore.open(path)
    expected = record["datastore"]["tokenizer_fingerprint"]
    if datastore.manifest["tokenizer"]["fingerprint"] != expected:
        raise ValueError(f"datastore {path} was built with another tokenizer than this run's; "
                         f"evaluate on the datastore the run was trained on, or retrain")
    return datastore


def run_neighbours(record: dict[str, Any], store: Datastore, required: bool, run_dir: str | Path | None = None,
                   hops: int | None = None):
    """The datastore's neighbours as the run was trained with them (for a learned retriever, those of the run's
    last refresh, in ``run_dir``; after ``hops`` hops, default the run's ``retrieval.hops``); for a plain LM,
    whatever neighbours the datastore has (for the overlap-filtered figures), or None."""
    from knnformer.neighbours import load_neighbours

    rcfg = record["config"]["retrieval"]
    hops = hops or rcfg.get("hops", 1)
    refresh = record.get("refresh") or {}
    if rcfg["enabled"] and refresh.get("id") and run_dir is not None:
        from knnformer.chunks import chunk_layout
        from knnformer.refresh import load_refresh

        return load_refresh(Path(run_dir) / refresh["folder"], store, chunk_layout(store, rcfg["chunk_size"]), hops)
    if rcfg["enabled"]:
        try:
            return load_neighbours(store, rcfg["embedder"] or None, rcfg["chunk_size"], hops=hops)
        except ValueError as e:
            if required:
                raise ValueError(f"this run was trained with retrieval and needs its datastore's neighbours: {e}; "
                                 f"or evaluate it as a plain LM with --retrieval off") from None
            return None
    try:
        return load_neighbours(store)
    except ValueError:
        return None


DEFAULT_GAIN_WINDOWS = 8
"""Windows ``evaluate`` measures each neighbour's gain on (``neighbour_gain``); each costs S*K extra forwards."""


def evaluate_run(run_dir: str | Path, split: str = "valid", stride: int | None = None, datastore: str | None = None,
                 batch_size: int = 32, progress_factory=None, retrieval: str = "auto",
                 gain_windows: int = DEFAULT_GAIN_WINDOWS) -> dict[str, Any]:
    """Score a split. ``retrieval``: ``on`` (the run must be a retrieval model), ``off`` (run as a plain LM) or
    ``auto`` (on for a retrieval run). With retrieval on, the figures with retrieval off come along, and with
    any neighbours in the datastore, RETRO's overlap-filtered bits per byte. With retrieval on and
    ``gain_windows`` > 0, ``neighbour_gain`` says what each served neighbour was worth (see ``neighbour_gain``);
    for a run with a learned retriever, ``refreshes`` lists each refresh's index recall."""
    from knnformer.retriever import frozen_vectors

    model, record, ckpt_path = load_run(run_dir)
    store = open_run_datastore(record, datastore)
    rcfg = record["config"]["retrieval"]
    if retrieval not in ("auto", "on", "off"):
        raise ValueError(f"--retrieval must be on or off, got {retrieval!r}")
    if retrieval == "on" and not rcfg["enabled"]:
        raise ValueError(f"{run_dir} was trained without retrieval; train with --set retrieval.enabled=true, or "
                         f"evaluate with --retrieval off")
    use_retrieval = rcfg["enabled"] and retrieval != "off"
    context = model.config.context
    tokens = store.require_split(split, 2)
    stride = stride or context
    neighbours = run_neighbours(record, store, required=use_retrieval, run_dir=run_dir)
    k = (rcfg["eval_neighbours"] or rcfg["num_neighbours"]) if rcfg["enabled"] else min(2, neighbours.k if neighbours else 2)
    continuation = rcfg["continuation"]
    past = rcfg["enabled"] and "past" in rcfg.get("sources", "train")
    if use_retrieval and stride % neighbours.chunk_size:
        raise ValueError(f"--stride must be a multiple of the chunk size {neighbours.chunk_size} with retrieval on")
    dtype = record["config"]["train"]["dtype"]
    token_bytes = store.tokenizer.token_bytes

    frozen = frozen_vectors(store, rcfg) if use_retrieval else None

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
    if use_retrieval:  # the gain of the second hop: the same run scored with either hop's neighbours
        hops = rcfg.get("hops", 1)
        try:
            other = run_neighbours(record, store, True, run_dir, hops=3 - hops)
        except ValueError:
            other = None  # the datastore (or refresh) holds one hop only
        if other is not None:
            total = score_tokens(model, tokens, token_bytes, stride, batch_size, dtype, None, neighbour_fn(other))
            bpb = {hops: result["bits_per_byte"], 3 - hops: summarize(total, split, stride, context)["bits_per_byte"]}
            result["second_hop"] = {
                "trained_with_hops": hops, "bits_per_byte_hop1": bpb[1], "bits_per_byte_hop2": bpb[2],
                "gain": bpb[1] - bpb[2],
                "sign": "bits per byte with hop-1 neighbours minus with hop-2 neighbours: positive = the second "
                        "hop helped",
                **({"note": "this run trained on hop-1 neighbours; it reads hop-2 neighbours at evaluation only"}
                   if hops == 1 else {})}
    if use_retrieval and gain_windows > 0:
        result["neighbour_gain"] = {"embedder": neighbours.info["embedder"],
                                    **neighbour_gain(model, tokens, nb_fn, gain_windows, dtype, batch_size)}
    refresh = record.get("refresh") or {}
    if refresh.get("id"):
        from knnformer.refresh import refresh_history

        result["refreshes"] = refresh_history(run_dir, refresh["id"])
    result["checkpoint"] = str(ckpt_path)
    result["step"] = int(Path(ckpt_path).name.split("-")[1])
    if neighbours is not None:
        result["neighbours"] = {"embedder": neighbours.info["embedder"], "k": k, "chunk_size": neighbours.chunk_size}
    return result


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
