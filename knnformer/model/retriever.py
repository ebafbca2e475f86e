"""A retriever that learns: the model embeds chunks itself and scores its neighbours with MARGE's relevance bias.

Shape legend:
    B  batch        S  neighbour slots (see retro.py)        K  neighbours per slot      C  chunk size
    D  decoder width      Dr  retriever width (``retrieval.retriever.dim``, default D)    N  chunks embedded at once

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

``retrieval.retriever.input=embedder``: the vectors are ``normalize(W @ e)``, e the datastore's frozen embedder
vector of the chunk (minilm's, say) and W (De, De) starting as the identity, so the retriever starts exactly at
the frozen embedder's neighbours. The caller hands the model e of every slot's query chunk (slot 0's too: it is
a datastore chunk before the window) and of every neighbour (``retrieval_vectors``, see batches.py); a refresh
projects the stored vectors instead of running the model over the corpus.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from knnformer.config import ModelConfig, RetrievalConfig


class LearnedRetriever(nn.Module):
    """The projection W and the scalar beta; the decoder blocks it reads belong to the model."""

    def __init__(self, model: ModelConfig, config: RetrievalConfig, input_dim: int = 0):
        super().__init__()
        self.layer = config.retriever.layer
        self.chunk_size = config.chunk_size
        self.reads_embedder = config.retriever.input == "embedder"
        if self.reads_embedder and input_dim <= 0:
            raise ValueError("retrieval.retriever.input=embedder needs the frozen "
                             "embedder's width (train fills it in from the datastore)")
        width = input_dim if self.reads_embedder else model.dim
        dim = config.retriever.dim or width
        self.proj = nn.Linear(width, dim, bias=False)
        self.beta = nn.Parameter(torch.tensor(float(config.retriever.relevance_beta)))
        self.identity_init = dim == width

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

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """Unit vectors (..., Dr) of frozen embedder vectors (..., De) (``retriever_input=embedder``); zero rows
        (no chunk) stay zero."""
        return F.normalize(self.proj(vectors), dim=-1, eps=1e-6)

    def relevance(self, decoder, idx: torch.Tensor, neighbours: torch.Tensor, mask: torch.Tensor,
                  vectors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``cos(q_s, z_j)`` (B, S, K) for window tokens ``idx`` (B, T) and neighbour tokens/mask (B, S, K, R):
        q_s from window chunk s - 1 (zero for slot 0), z_j from the neighbour's own first C tokens. Reading the
        embedder: from ``vectors`` = (frozen vectors of each slot's query chunk (B, S, De), of each neighbour
        (B, S, K, De))."""
        if self.reads_embedder:
            if vectors is None:
                raise ValueError("this model's learned retriever reads the frozen embedder's vectors "
                                 "(retriever_input=embedder): pass retrieval_vectors with the neighbours")
            q, z = self.project(vectors[0].float()), self.project(vectors[1].float())
            return torch.einsum("bsd,bskd->bsk", q, z)
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
