"""What each served neighbour was worth: the loss of the chunk it served with that one neighbour masked out
minus the loss with every neighbour, on a few windows of a split (``neighbour_gain``, which ``evaluate``
reports for a retrieval model). Positive: the neighbour lowered the loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from knnformer.eval.scoring import NeighbourFn, neighbour_model_inputs
from knnformer.model.transformer import Transformer
from knnformer.runtime import autocast

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


DEFAULT_GAIN_WINDOWS = 8
"""Windows ``evaluate`` measures each neighbour's gain on (``neighbour_gain``); each costs S*K extra forwards."""
