"""A retriever that learns: the model embeds chunks itself and scores its neighbours with MARGE's relevance bias.

Shape legend:
    B  batch        S  neighbour slots (see retro.py)        K  neighbours per slot      C  chunk size
    D  decoder width      Dr  retriever width (``retrieval.retriever_dim``, default D)    N  chunks embedded at once

The representation. A chunk's vector is ``normalize(W @ mean(h))``, h the states after decoder blocks
0 .. ``retriever_layer`` run on the chunk's own tokens alone (positions 0 .. C - 1, no window around it). Run
alone, the same function embeds a query chunk inside a training window, a neighbour inside the forward pass,
and every chunk of the datastore at a refresh: the index is searched with exactly the vectors the bias scores.
(The window's own states would be free for the query, but they depend on the text before the chunk, which the
refresh does not see.) W starts as the identity when Dr = D, so an untrained retriever is the run's mean-pooled
chunk state, the representation ``--embedder run:RUN`` uses (there: final states, here: block ``retriever_layer``).

The bias. Chunked cross-attention from slot s to neighbour j adds ``beta * cos(q_s, z_j)`` to the logits of all
of j's keys, beta a learned scalar: the softmax gradient reaches q, z, W, beta and the shared decoder blocks.
Slot 0's query chunk lies before the window, so it has no vector here: its bias is zero.
Causality: slot s >= 1's query is window chunk s - 1, whose last token sits at s*C - 1, the first position
slot s serves.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from knnformer.config import ModelConfig, RetrievalConfig


class LearnedRetriever(nn.Module):
    """The projection W and the scalar beta; the decoder blocks it reads belong to the model."""

    def __init__(self, model: ModelConfig, config: RetrievalConfig):
        super().__init__()
        self.layer = config.retriever_layer
        self.chunk_size = config.chunk_size
        dim = config.retriever_dim or model.dim
        self.proj = nn.Linear(model.dim, dim, bias=False)
        self.beta = nn.Parameter(torch.tensor(float(config.relevance_beta)))
        self.identity_init = dim == model.dim

    def reset_parameters(self) -> None:
        """Identity projection when widths match (see the module docstring); the model's init otherwise."""
        if self.identity_init:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(self.proj.weight.shape[0]))

    def embed(self, decoder, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit vectors (N, Dr) of chunks ``tokens`` (N, C) with ``mask`` (N, C) (real tokens first, padding after:
        the causal blocks leave a real position untouched by padding after it). An all-masked row gives zeros."""
        N, C = tokens.shape
        x = decoder.embed(tokens)  # (N, C, D)
        cos, sin = decoder.rope_cos[:C], decoder.rope_sin[:C]
        for block in decoder.blocks[: self.layer + 1]:
            x = block(x, cos, sin)
        m = mask.to(x.dtype)[..., None]  # (N, C, 1)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1)  # (N, D)
        return F.normalize(self.proj(pooled), dim=-1, eps=1e-6)

    def relevance(self, decoder, idx: torch.Tensor, neighbours: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``cos(q_s, z_j)`` (B, S, K) for window tokens ``idx`` (B, T) and neighbour tokens/mask (B, S, K, R):
        q_s from window chunk s - 1 (zero for slot 0), z_j from the neighbour's own first C tokens."""
        B, S, K, R = neighbours.shape
        C = self.chunk_size
        z = self.embed(decoder, neighbours[..., :C].reshape(-1, C), mask[..., :C].reshape(-1, C))
        z = z.view(B, S, K, -1)  # (B, S, K, Dr)
        q = self.embed(decoder, idx[:, : (S - 1) * C].reshape(-1, C), torch.ones(B * (S - 1), C, dtype=torch.bool,
                                                                                 device=idx.device))
        q = torch.cat([z.new_zeros(B, 1, z.shape[-1]), q.view(B, S - 1, z.shape[-1])], dim=1)  # (B, S, Dr)
        return torch.einsum("bsd,bskd->bsk", q, z)

    def bias(self, relevance: torch.Tensor, R: int) -> torch.Tensor:
        """``beta * relevance`` on each of a neighbour's R keys: (B*S, 1, 1, K*R), added to CCA's logits."""
        B, S, K = relevance.shape
        return (self.beta * relevance).reshape(B * S, 1, 1, K, 1).expand(-1, -1, -1, -1, R).reshape(B * S, 1, 1, K * R)


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
