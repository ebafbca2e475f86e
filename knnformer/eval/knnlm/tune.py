"""kNN-LM's interpolation and its tuning.

    p(w | x)     = lambda * p_knn(w | x) + (1 - lambda) * p_lm(w | x)
    p_knn(w | x) = sum over the k nearest keys j of h(x) whose value v_j = w of softmax_j(-d_j / temperature)

Everything here works from a search already done: per query, the LM's log-probability of its target, the squared
distances ``D`` (nq, k_max) to its nearest keys, nearest first, and ``match`` (nq, k_max), true where a key's value
is the target. Running sums over the sorted neighbours give p_knn for every k at once, so every (lambda, k) of the
grids is scored at a temperature in one pass (``grid_losses``); ``tune`` searches the temperatures around the
distances' own scale, and ``tune_by_distance`` then picks lambda and k once more per quantile bin of the nearest
key's distance (up to ``LAMBDA_BINS`` bins of at least 1,000 tuning queries).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

LAMBDA_BINS = 32  # at most; one bin per 1,000 tuning queries
LAMBDAS = tuple(round(0.05 * i, 2) for i in range(19))  # 0 .. 0.9


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
         temperatures=None, progress=None) -> dict[str, Any]:
    """The (lambda, k, temperature) with the lowest mean NLL over the queries given: their LM log-probabilities
    (nq,), squared distances (nq, kmax) and target matches (nq, kmax). Every lambda and k of the grids is tried
    at each temperature. Temperatures: those given, or else, as multiples of ``temperature_scale``, 2^i for i in
    -4..4 (extended by factors of 2 past an end while the end is best), then the best refined by factors
    2^(+-1/2) and 2^(+-1/4). ``progress(1)`` after each temperature's pass over the grid."""
    if len(logp_lm) == 0:
        raise ValueError("no tokens to tune kNN-LM on")
    ks = list(ks) if ks is not None else k_grid(D.shape[1])
    tried: dict[float, np.ndarray] = {}

    def best_at(ts) -> float:
        for t in ts:
            if t not in tried:
                tried[t] = grid_losses(logp_lm, D, match, lambdas, ks, t)
                if progress is not None:
                    progress(1)
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

