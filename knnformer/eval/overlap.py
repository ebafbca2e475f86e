"""RETRO's overlap filtering: how much of each evaluated chunk its retrieved neighbours already contain, and the
bits per byte over only the chunks that overlap little.

A chunk's overlap ratio r is the longest run of its tokens that also occurs, in order, in one of the neighbours
serving it, over the chunk size. ``filtered_figures`` reports bits per byte over the chunks with r <= alpha for
each alpha of ``ALPHAS``, so a gain from retrieval can be told apart from copying the neighbours.
"""

from __future__ import annotations

import math

import numpy as np

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
