"""Scoring tokens with a model: the windows that cover a split, their batches, and the neighbours a retrieval
model reads in each.

- ``window_plan``: windows of the context at a stride, every target position 1 .. N - 1 scored by exactly one.
- ``window_batches``: those windows batched by equal length, with the model's neighbour inputs.
- ``NeighbourFn`` / ``neighbour_fn_for``: what serves a window its RETRO neighbours, as training served them.
- ``score_tokens``: total (and, optionally, per-token) negative log-likelihood and bytes of a split.

``evaluate``, ``gain`` and kNN-LM's hidden states all go through these, so they see the same windows.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from knnformer.model.transformer import Transformer
from knnformer.runtime import autocast


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
    from knnformer.run.batches import neighbour_inputs, relevance_vectors

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
