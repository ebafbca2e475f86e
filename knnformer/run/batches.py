"""Training and evaluation inputs: windows of a split, and for a retrieval model the tokens of the neighbours
each window's chunks retrieved (precomputed by ``knnformer index``: no search happens here).

A retrieval window starts on its split's chunk grid, so its chunks are datastore chunks with precomputed
neighbours. It reads S = n + 1 neighbour slots (see retro.py): the chunk before the window, then its n chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from knnformer.retrieval.neighbours import Neighbours


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) input ids
    y: torch.Tensor  # (B, T) target ids
    neighbours: torch.Tensor | None = None  # (B, S, K, R) neighbour token ids
    neighbour_mask: torch.Tensor | None = None  # (B, S, K, R) True where a neighbour token exists
    neighbour_ids: np.ndarray | None = None  # (B, S, K) train chunk ids, -1 for none
    retrieval_vectors: tuple[torch.Tensor, torch.Tensor] | None = None  # see relevance_vectors

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        vectors = None if self.retrieval_vectors is None else tuple(v.to(device) for v in self.retrieval_vectors)
        return Batch(self.x.to(device), self.y.to(device), move(self.neighbours), move(self.neighbour_mask),
                     self.neighbour_ids, vectors)

    def model_inputs(self) -> dict:
        inputs = {"neighbours": self.neighbours, "neighbour_mask": self.neighbour_mask}
        if self.retrieval_vectors is not None:
            inputs["retrieval_vectors"] = self.retrieval_vectors
        return inputs


def window_rows(data: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """(B, length + 1) int64 token windows of ``data`` beginning at ``starts``."""
    return torch.from_numpy(data[starts[:, None] + np.arange(length + 1)].astype(np.int64))


def neighbour_inputs(neighbours: Neighbours, split: str, starts: np.ndarray, length: int, k: int,
                     continuation: bool = True, past: bool = False) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Neighbour tokens (B, S, K, R), mask and chunk ids (B, S, K) for windows of ``length`` tokens of ``split``
    starting at split-relative ``starts`` (multiples of the chunk size). S = length // C + 1. With ``past``, each
    slot's neighbours also draw on its document's chunks before the window (``Neighbours.with_past``)."""
    C = neighbours.chunk_size
    lo, _ = neighbours.store.split_range(split)
    ids = neighbours.window_chunk_ids(split, lo + np.asarray(starts, dtype=np.int64), length + C, previous=True)
    if past:
        first = neighbours.layout.split_chunks[split][0] + np.asarray(starts, dtype=np.int64) // C
        nb = neighbours.with_past(ids[:, : length // C + 1], first, k)
    else:
        nb = neighbours.for_chunks(ids[:, : length // C + 1], k)
    tokens, mask = nb.tokens, nb.mask
    if not continuation:
        tokens, mask = tokens[..., :C], mask[..., :C]
    return torch.from_numpy(np.ascontiguousarray(tokens)), torch.from_numpy(np.ascontiguousarray(mask)), nb.ids


def relevance_vectors(vectors: np.ndarray, neighbours: Neighbours, split: str, starts: np.ndarray, length: int,
                      neighbour_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """For a learned retriever reading the frozen embedder (``retrieval.retriever.input=embedder``): the rows of
    ``vectors`` (the datastore's embeddings, every chunk) of each slot's query chunk (B, S, De) and of each
    neighbour ``neighbour_ids`` (B, S, K) -> (B, S, K, De), float32, zeros for -1 (no chunk). Windows as in
    ``neighbour_inputs``; slot s's query is the chunk whose neighbours it reads."""
    C = neighbours.chunk_size
    lo, _ = neighbours.store.split_range(split)
    S = length // C + 1
    query = neighbours.window_chunk_ids(split, lo + np.asarray(starts, dtype=np.int64), length + C, previous=True)
    return gather_rows(vectors, query[:, :S]), gather_rows(vectors, np.asarray(neighbour_ids))


def gather_rows(vectors: np.ndarray, ids: np.ndarray) -> torch.Tensor:
    """Rows of ``vectors`` at ``ids`` (any shape) as float32 (*ids.shape, d), zeros where ids < 0."""
    ids = np.asarray(ids, dtype=np.int64)
    rows = np.asarray(vectors[np.maximum(ids, 0).reshape(-1)], dtype=np.float32).reshape(*ids.shape, -1)
    rows[ids < 0] = 0
    return torch.from_numpy(rows)


class WindowSampler:
    """Random training windows of a split, seeded by ``generator``; chunk-aligned when retrieving."""

    def __init__(self, data: np.ndarray, context: int, neighbours: Neighbours | None = None, split: str = "train",
                 k: int = 2, continuation: bool = True, past: bool = False, vectors: np.ndarray | None = None):
        self.data, self.context, self.neighbours = data, context, neighbours
        self.split, self.k, self.continuation, self.past = split, k, continuation, past
        self.vectors = vectors  # the frozen embedder's, for a learned retriever reading them
        if len(data) < context + 2:
            raise ValueError(f"the {split} split has {len(data)} tokens, fewer than one window of {context + 1}")

    def sample(self, batch: int, generator: torch.Generator) -> Batch:
        T = self.context
        if self.neighbours is None:
            starts = torch.randint(len(self.data) - T, (batch,), generator=generator).numpy()
            rows = window_rows(self.data, starts, T)
            return Batch(rows[:, :-1], rows[:, 1:])
        C = self.neighbours.chunk_size
        starts = C * torch.randint((len(self.data) - T - 1) // C + 1, (batch,), generator=generator).numpy()
        rows = window_rows(self.data, starts, T)
        tokens, mask, ids = neighbour_inputs(self.neighbours, self.split, starts, T, self.k, self.continuation,
                                             self.past)
        vectors = None if self.vectors is None else relevance_vectors(self.vectors, self.neighbours, self.split,
                                                                      starts, T, ids)
        return Batch(rows[:, :-1], rows[:, 1:], tokens, mask, ids, vectors)
