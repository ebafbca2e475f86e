"""Chinchilla's scaling law fitted to a sweep: ``L(N, D) = E + A / N^alpha + B / D^beta``.

``fit_law`` fits it as Hoffmann et al. (2022, appendix D.2) and Besiroglu et al.'s replication (2024) do: the
Huber loss (delta 1e-3) of log L-hat - log L, with log L-hat = LSE(a - alpha log N, b - beta log D, e) and
A = exp(a), B = exp(b), E = exp(e), minimised with L-BFGS from a grid of starting points, the best kept.
``bootstrap`` refits on points resampled with replacement and gives percentile intervals of the parameters and
of everything derived from them: the compute-optimal N and D for a budget C = 6 N D (``optimal_allocation``),
and what retrieval is worth in parameters (``dense_equivalent``): the dense N that the law says reaches a
retrieval model's loss with the same training tokens, over the retrieval model's own N.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

NUM_PARAMS = 5  # a, b, e, alpha, beta
HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D):
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray) -> tuple[float, np.ndarray]:
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    s = w.sum(axis=0)
    pred = top + np.log(s)
    r = pred - logL
    small = np.abs(r) <= HUBER_DELTA
    huber = np.where(small, 0.5 * r * r, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))  # d huber / d r
    p = w / s  # d pred / d term
    grad = np.array([(dr * p[0]).sum(), (dr * p[1]).sum(), (dr * p[2]).sum(),
                     (dr * p[0] * -logN).sum(), (dr * p[1] * -logD).sum()])
    return float(huber.sum()), grad


def _starts() -> list[np.ndarray]:
    return [np.array([a, b, e, al, be]) for a in (0.0, 5.0, 10.0, 20.0) for b in (0.0, 5.0, 10.0, 20.0)
            for e in (-1.0, 0.0, 1.0) for al in (0.1, 0.3, 0.6) for be in (0.1, 0.3, 0.6)]


def fit_law(N, D, L, starts: list[np.ndarray] | None = None) -> tuple[Law, float]:
    """The law minimising the summed Huber loss of log-loss residuals over the points; and that loss."""
    from scipy.optimize import minimize

    N, D, L = (np.asarray(x, dtype=np.float64) for x in (N, D, L))
    if len(L) < NUM_PARAMS:
        raise ValueError(f"a scaling-law fit needs at least {NUM_PARAMS} points (it has {NUM_PARAMS} parameters); "
                         f"got {len(L)}")
    if (N <= 0).any() or (D <= 0).any() or (L <= 0).any():
        raise ValueError("a scaling-law fit needs positive N, D and loss")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    best, best_value = None, math.inf
    bounds = [(-20, 60), (-20, 60), (-10, 5), (0.0, 3.0), (0.0, 3.0)]
    for x0 in starts if starts is not None else _starts():
        res = minimize(_objective, x0, args=(logN, logD, logL), jac=True, method="L-BFGS-B", bounds=bounds)
        if res.fun < best_value:
            best, best_value = res.x, float(res.fun)
    a, b, e, alpha, beta = best
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta)), best_value


def optimal_allocation(law: Law, compute: float) -> tuple[float, float]:
    """Chinchilla's compute-optimal N and D for a budget of ``compute`` FLOPs, with C = 6 N D."""
    G = (law.alpha * law.A / (law.beta * law.B)) ** (1.0 / (law.alpha + law.beta))
    a = law.beta / (law.alpha + law.beta)
    return G * (compute / 6.0) ** a, (compute / 6.0) ** (1.0 - a) / G


def dense_equivalent(law: Law, loss: float, D: float) -> float:
    """The N at which the law reaches ``loss`` with D training tokens; inf when the loss lies at or below what
    any N reaches with D tokens (E + B / D^beta): beyond what the fitted law can price."""
    excess = loss - law.E - law.B / D ** law.beta
    if excess <= 0:
        return math.inf
    return (law.A / excess) ** (1.0 / law.alpha)


def interval(values, level: float = 0.95) -> list[float] | None:
    """The central percentile interval of the finite values (inf is kept as an upper end), None if empty."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if not len(v):
        return None
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)], method="nearest")  # no inf - inf
    return [float(lo), float(hi)]


def bootstrap(N, D, L, samples: int, seed: int, law: Law) -> list[Law]:
    """Laws refitted on ``samples`` resamples of the points (with replacement), each started from the full fit
    and a few grid points; resamples with fewer distinct points than parameters are drawn again."""
    rng = np.random.default_rng(seed)
    N, D, L = (np.asarray(x, dtype=np.float64) for x in (N, D, L))
    full = np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])
    grid = _starts()
    laws = []
    while len(laws) < samples:
        idx = rng.integers(0, len(L), len(L))
        if len(np.unique(idx)) < NUM_PARAMS:
            continue
        starts = [full] + [grid[i] for i in rng.choice(len(grid), 4, replace=False)]
        laws.append(fit_law(N[idx], D[idx], L[idx], starts)[0])
    return laws


def plot_frontier(points: list[dict], law: Law, laws: list[Law], path, ylabel: str, title: str,
                  budgets: list[float]) -> None:
    """Loss against training compute (6 N D) of every point, dense and retrieval apart, with the fitted
    compute-optimal frontier L(N_opt(C), D_opt(C)) and its bootstrap band; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, marker in (("dense", "o"), ("retrieval", "^")):
        sel = [p for p in points if (p["retrieval"] != "off") == (label == "retrieval")]
        if sel:
            sc = ax.scatter([p["compute"] for p in sel], [p["loss"] for p in sel], c=[math.log10(p["N"]) for p in sel],
                            marker=marker, cmap="viridis", label=label, edgecolors="k", linewidths=0.4)
    cs = np.geomspace(min(p["compute"] for p in points) / 2, max(max(p["compute"] for p in points) * 4,
                                                                   max(budgets or [0])), 100)
    frontier = [law.loss(*optimal_allocation(law, c)) for c in cs]
    ax.plot(cs, frontier, "k-", lw=1.2, label="fitted compute-optimal frontier (dense)")
    if laws:
        band = np.array([[lw.loss(*optimal_allocation(lw, c)) for c in cs] for lw in laws])
        lo, hi = np.percentile(band, [2.5, 97.5], axis=0)
        ax.fill_between(cs, lo, hi, color="k", alpha=0.12, lw=0, label="95% bootstrap band")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute 6 N D (FLOPs; N without the embedding)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if points:
        fig.colorbar(sc, ax=ax, label="log10 N")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
