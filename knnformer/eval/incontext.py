"""In-context retrieval (In-Context RALM, Ram et al. 2023): any language model reads retrieved text placed before
its window, with no training.

The split is scored in blocks of ``stride`` tokens (a multiple of the chunk size C). Block ``[p, p + stride)`` is
served by the neighbours of the chunk just before it (tokens ``[p - C, p)``, so retrieval never sees what it
predicts); the input is those neighbours' tokens (each its chunk and continuation, the nearest one last, next to
the text) followed by as much history before the block as the context leaves. Every target 1 .. N - 1 is scored
once. The figure to compare with is the same model with retrieval off over sliding windows of the full context
at the same stride (``score_tokens(stride=stride)``), which has more history than the in-context windows: the
comparison is conservative.

Shapes: B windows per batch, L <= context input length, P the prefix (neighbour) tokens of a window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from knnformer.model.transformer import Transformer
from knnformer.runtime import autocast

PrefixFn = Callable[[np.ndarray], list[np.ndarray]]
"""``prefix(query_chunks)``: for split-relative chunk indices (-1 = none), each window's prefix token ids."""


def in_context_plan(num_tokens: int, stride: int) -> list[tuple[int, int]]:
    """Blocks as (first target p, one past the last target): targets 1 .. num_tokens - 1, each in one block."""
    return [(max(p, 1), min(p + stride, num_tokens)) for p in range(0, num_tokens - 1, stride)
            if max(p, 1) < min(p + stride, num_tokens)]


def block_query(p: int, chunk_size: int) -> int:
    """The split-relative chunk whose neighbours serve the block starting at target ``p`` (-1: none)."""
    return (p // chunk_size) - 1 if p >= chunk_size else -1


@torch.no_grad()
def score_in_context(model: Transformer, tokens: np.ndarray, token_bytes: np.ndarray, chunk_size: int,
                     prefix: PrefixFn, stride: int | None = None, batch_size: int = 32, dtype: str = "float32",
                     progress: Callable[[int], None] | None = None, per_token: bool = False) -> dict[str, Any]:
    """Total (and with ``per_token`` per-target) negative log-likelihood of ``tokens[1:]`` with retrieved text in
    context, in blocks of ``stride`` (default: ``chunk_size``). ``prefix(query_chunks)`` gives each block's
    neighbour tokens; a prefix longer than ``context - stride`` is cut from its start (farthest neighbour)."""
    T, C = model.config.context, chunk_size
    stride = stride or C
    if stride % C or not 0 < stride < T:
        raise ValueError(f"the in-context stride must be a multiple of the chunk size {C} below the context {T}, "
                         f"got {stride}")
    model.eval()
    device = next(model.parameters()).device
    plan = in_context_plan(len(tokens), stride)
    tb = np.asarray(token_bytes)
    losses_out = np.zeros(max(0, len(tokens) - 1), dtype=np.float32) if per_token else None
    nll, num_tokens, num_bytes, prefix_len = 0.0, 0, 0, 0
    for b in range(0, len(plan), batch_size):
        group = plan[b : b + batch_size]
        pre = prefix(np.array([block_query(p, C) for p, _ in group]))
        rows, spans = [], []
        for (p, e), pf in zip(group, pre):
            pf = pf[max(0, len(pf) - (T - stride)) :]  # (P,) keep the nearest neighbour whole
            a = max(0, e - 1 - (T - len(pf)))
            text = np.asarray(tokens[a : e - 1], dtype=np.int64)
            rows.append(np.concatenate([pf, text]))
            spans.append((len(pf), a, p, e))
            prefix_len += len(pf)
        L = max(len(r) for r in rows)
        x = torch.zeros(len(rows), L, dtype=torch.long)  # padded on the right: causal, so it changes nothing before
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.from_numpy(r)
        with autocast(dtype, device):
            logits, _ = model(x.to(device))  # (B, L, V)
        logp = F.log_softmax(logits.float(), -1).cpu()
        for i, (P, a, p, e) in enumerate(spans):
            targets = torch.from_numpy(np.asarray(tokens[p:e], dtype=np.int64))
            pos = P + np.arange(p, e) - 1 - a  # the input position predicting target t is P + (t - 1 - a)
            loss = -logp[i, torch.from_numpy(pos), targets].double()
            nll += float(loss.sum())
            num_tokens += e - p
            num_bytes += int(tb[targets.numpy()].sum())
            if losses_out is not None:
                losses_out[p - 1 : e - 1] = loss.numpy()
        if progress is not None:
            progress(sum(e - p for p, e in group))
    out = {"nll": nll, "tokens": num_tokens, "bytes": num_bytes,
           "mean_prefix_tokens": prefix_len / max(1, len(plan)), "stride": stride}
    if losses_out is not None:
        out["losses"] = losses_out
    return out
