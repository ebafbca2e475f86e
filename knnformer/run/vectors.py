"""The learned retriever's vectors outside the forward pass: of token rows and of every chunk (for refreshes), of
the frozen embedder's stored vectors through the learned projection (``retrieval.retriever.input=embedder``), and the run's
learned retriever as an embedder of text for live retrieval. See ``model/retriever.py`` for the retriever."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from knnformer.config import RetrievalConfig

logger = logging.getLogger(__name__)


def reads_embedder(rcfg: RetrievalConfig) -> bool:
    """Whether a run's retrieval config has a learned retriever reading the frozen embedder's vectors."""
    return rcfg.retriever.kind == "learned" and rcfg.retriever.input == "embedder"


def frozen_vectors(store, rcfg: RetrievalConfig, width: int = 0) -> np.ndarray | None:
    """For a learned retriever reading the frozen embedder: the datastore's vectors of every chunk (memory-mapped;
    the embedder and chunk size the run's neighbours came from), refused unless ``width`` wide (0: any), else
    None."""
    if not reads_embedder(rcfg):
        return None
    from knnformer.retrieval.neighbours import load_neighbours

    base = load_neighbours(store, rcfg.search.embedder or None, rcfg.chunk_size or None)
    if base.vectors is None:
        raise ValueError(f"retrieval.retriever.input=embedder reads the frozen embedder's vectors, but "
                         f"{store.path}'s neighbours ({base.info['embedder']}) have none stored: bm25 is not an "
                         f"embedding; index with a dense embedder (`knnformer index {store.path} --embedder minilm`)"
                         f", or use retriever.input=tokens")
    if width and base.vectors.shape[1] != width:
        raise ValueError(f"the run's retriever reads {width}-wide embedder vectors, but {store.path} holds "
                         f"{base.vectors.shape[1]}-wide ones; evaluate on the datastore it was trained on")
    return base.vectors


@torch.no_grad()
def project_vectors(model, vectors: np.ndarray, batch_size: int = 65_536,
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The learned retriever's unit vectors (N, Dr) float32 of frozen embedder vectors (N, De) (any float dtype,
    memory-mapped or not), ``batch_size`` rows at a time: what a refresh indexes for ``retriever_input=embedder``."""
    retriever = model.retrieval.retriever
    out = np.zeros((len(vectors), retriever.proj.weight.shape[0]), dtype=np.float32)
    device = retriever.proj.weight.device
    for b in range(0, len(vectors), batch_size):
        x = torch.from_numpy(np.asarray(vectors[b : b + batch_size], dtype=np.float32)).to(device)
        out[b : b + len(x)] = retriever.project(x).cpu().numpy()
        if progress is not None:
            progress(len(x))
    return out


@torch.no_grad()
def embed_token_rows(model, ids: np.ndarray, mask: np.ndarray, batch_size: int = 512,
                     progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The learned retriever's unit vectors (N, Dr) float32 of token rows ``ids`` (N, L) with ``mask`` (N, L)
    (real tokens first; L at most the context), in eval mode (no dropout: the same weights always give the same
    vectors), ``batch_size`` rows at a time."""
    retriever = model.retrieval.retriever
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(ids), retriever.proj.weight.shape[0]), dtype=np.float32)
    try:
        for b in range(0, len(ids), batch_size):
            x = torch.from_numpy(np.asarray(ids[b : b + batch_size], dtype=np.int64)).to(device)
            m = torch.from_numpy(np.asarray(mask[b : b + batch_size], dtype=bool)).to(device)
            out[b : b + len(x)] = retriever.embed(model, x, m).float().cpu().numpy()
            if progress is not None:
                progress(len(x))
    finally:
        model.train(was_training)
    return out


def embed_all_chunks(model, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, batch_size: int = 512,
                     progress: Callable[[int], None] | None = None) -> np.ndarray:
    """``embed_token_rows`` of chunks ``tokens[starts[i]:ends[i]]``, read ``batch_size`` chunks at a time."""
    C = model.retrieval.retriever.chunk_size
    out = np.zeros((len(starts), model.retrieval.retriever.proj.weight.shape[0]), dtype=np.float32)
    ar = np.arange(C)
    for b in range(0, len(starts), batch_size):
        s, e = starts[b : b + batch_size], ends[b : b + batch_size]
        pos = s[:, None] + ar
        mask = pos < e[:, None]
        ids = np.where(mask, np.asarray(tokens[np.where(mask, pos, 0).reshape(-1)]).reshape(pos.shape), 0)
        out[b : b + len(s)] = embed_token_rows(model, ids, mask, batch_size, progress)
    return out


class LearnedEmbedder:
    """A run's learned retriever as an embedder of text, for ``neighbours.Retriever`` (live retrieval while
    generating): each text is tokenized (at most the context's tokens) and embedded as ``embed_token_rows``
    does. Decoding a chunk and encoding it again gives back its tokens exactly with the bytes tokenizer; with
    BPE, rarely, a merge across the chunk's edge differs."""

    sparse = False

    def __init__(self, model, tokenizer, name: str = "learned"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.dim = model.retrieval.retriever.proj.weight.shape[0]

    def embed(self, texts) -> np.ndarray:
        rows = [self.tokenizer.encode(t)[: self.model.config.context] for t in texts]
        L = max([len(r) for r in rows] + [1])
        ids = np.zeros((len(rows), L), dtype=np.int64)
        mask = np.zeros((len(rows), L), dtype=bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, True
        return embed_token_rows(self.model, ids, mask)


class ProjectedEmbedder:
    """A run's learned retriever reading the frozen embedder, as an embedder of text for live retrieval: the
    frozen embedder's vectors of the texts through the run's projection."""

    sparse = False

    def __init__(self, model, frozen, name: str = "learned"):
        self.model, self.frozen, self.name = model, frozen, name
        self.dim = model.retrieval.retriever.proj.weight.shape[0]

    def embed(self, texts) -> np.ndarray:
        return project_vectors(self.model, self.frozen.embed(texts))
