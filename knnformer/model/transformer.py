"""The decoder: token embedding, blocks of (RMSNorm, causal self-attention with rotary positions, RMSNorm,
SwiGLU), final RMSNorm and a head tied to the embedding. Attention is exact softmax (SDPA) or Performer's FAVOR+
(performer.py), picked by ``model.attention``; ``model.causal: false`` makes the blocks bidirectional (encoders).

Shape legend:
    B  batch            T  sequence length (<= context)     V  vocabulary
    D  model width      H  attention heads                  Dh head width (D / H)
    F  SwiGLU hidden width
The Mixture-of-Experts feed-forward (``model.ffn: moe``) lives in moe.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from knnformer.config import ModelConfig, RetrievalConfig
from knnformer.model.layers import Block, KVCache, RMSNorm, empty_cache, init_weights, rotary_tables
from knnformer.model.moe import MoE
from knnformer.model.performer import PerformerCache


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, retrieval: RetrievalConfig | None = None, retriever_input_dim: int = 0):
        """``retriever_input_dim``: the width of the frozen embedder vectors a learned retriever reads
        (``retrieval.retriever.input=embedder``), which the trainer derives from the datastore."""
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the CLI takes it from the datastore's tokenizer)")
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        cos, sin = rotary_tables(config.context, config.dim // config.num_heads, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.retrieval = None
        if retrieval is not None and retrieval.enabled:
            from knnformer.model.retro import Retrieval

            self.retrieval = Retrieval(config, retrieval, retriever_input_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.config)
        if self.retrieval is not None and self.retrieval.retriever is not None:
            self.retrieval.retriever.reset_parameters()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | PerformerCache | None = None, neighbours: torch.Tensor | None = None,
                      neighbour_mask: torch.Tensor | None = None,
                      retrieval_vectors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, D) of token ids (B, T). With ``neighbours`` (B, S, K, R) token ids
        and their ``neighbour_mask`` (B, S, K, R), the retrieval layers read them (see retro.py); without, the
        model is exactly the plain decoder."""
        B, T = idx.shape
        per_row = cache is not None and isinstance(cache.length, torch.Tensor)  # rows at their own positions
        if per_row:
            if T != 1:
                raise ValueError("a cache whose rows sit at different positions steps one token at a time")
            pos = cache.length[:, None]  # (B, 1)
            end = int(cache.length.max()) + 1 if B else 0
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (B, 1, Dh)
        else:
            start = cache.length if cache is not None else 0
            end = start + T
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
            pos = torch.arange(start, end, device=idx.device).expand(B, T)
        if end > self.config.context:
            raise ValueError(f"sequence of {end} tokens is longer than the model's context {self.config.context}")
        x = self.embed(idx)  # (B, T, D)
        retrieve = neighbours is not None and self.retrieval is not None
        cached = getattr(cache, "retrieval", None) if self.retrieval is not None else None  # a RetrievalCache
        if retrieve and cache is not None:
            if cached is None:
                raise ValueError("retrieval with a KV cache needs the cache from Transformer.generation_cache")
            for b in range(B):  # neighbours (B, S, K, R) fill slots 0 .. S - 1 of the cache's window
                for s in range(neighbours.shape[1]):
                    vectors = None if retrieval_vectors is None else (retrieval_vectors[0][b, s],
                                                                      retrieval_vectors[1][b, s])
                    cached.put(b, s, neighbours[b, s], neighbour_mask[b, s], vectors)
            retrieve = False
        encoded = relevance = None
        if retrieve and self.retrieval.retriever is not None:  # a learned retriever scores the neighbours
            relevance = self.retrieval.retriever.relevance(self, idx, neighbours, neighbour_mask,
                                                           retrieval_vectors)  # (B, S, K)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
            if cached is not None and i in self.retrieval.layers:  # generation: slots encoded once, kept
                if i == self.retrieval.layers[0]:
                    self.retrieval.prepare_slots(self, cached, idx, x, pos)
                x = self.retrieval.cross_attend_cached(i, x, cached, pos, aligned=not per_row)
            elif retrieve and i in self.retrieval.layers:
                if encoded is None:
                    encoded = self.retrieval.encode(self.embed(neighbours), neighbour_mask, x)
                x = self.retrieval.cross_attend(i, x, encoded, neighbour_mask, relevance)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def generation_cache(self, batch: int, num_neighbours: int = 0, neighbour_tokens: int = 0,
                         vector_dim: int = 0) -> KVCache | PerformerCache:
        """An empty generation cache for ``batch`` rows; for a retrieval model given ``num_neighbours`` (K) of
        ``neighbour_tokens`` (R) tokens each, with a ``RetrievalCache`` beside it (``vector_dim``: the frozen
        embedder's width, for a learned retriever that reads it), so generation retrieves without recomputing
        the past."""
        p = next(self.parameters())
        cache = empty_cache(self.config, batch, p.device, p.dtype)
        if self.retrieval is not None and num_neighbours > 0:
            from knnformer.model.retro import RetrievalCache

            if not isinstance(cache, KVCache):
                raise ValueError("generation with retrieval keeps a KV cache: it needs model.attention=softmax")
            cache.retrieval = RetrievalCache(self.retrieval, self.config, batch, num_neighbours, neighbour_tokens,
                                             p.device, p.dtype, vector_dim)
        return cache

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | PerformerCache | None = None,
                neighbours: torch.Tensor | None = None, neighbour_mask: torch.Tensor | None = None,
                retrieval_vectors: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Logits (B, T, V); with ``targets`` (B, T) also the mean cross-entropy in nats. ``retrieval_vectors``:
        for a learned retriever reading the frozen embedder (retriever.py)."""
        h = self.hidden_states(idx, cache, neighbours, neighbour_mask, retrieval_vectors)
        logits = F.linear(h, self.embed.weight)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def aux_loss(self) -> torch.Tensor | None:
        """The weighted auxiliary losses of the MoE layers' last forward (the trainer adds them to the
        cross-entropy, which ``forward`` returns alone so that every reported loss stays comparable); None for a
        dense model."""
        losses = [block.ffn.aux_loss for block in self.blocks
                  if isinstance(block.ffn, MoE) and block.ffn.aux_loss is not None]
        return sum(losses) if losses else None


def ffn_active_params(config: ModelConfig, layer: int) -> float:
    """Feed-forward weights each token multiplies by in block ``layer``: the dense SwiGLU's, or for an MoE the
    router's plus k experts' (k = 1 for top1, 2 for top2, the capacity factor for expert choice; capacity padding
    and dropped tokens not counted)."""
    D = config.dim
    if not config.is_moe_layer(layer):
        return 3 * D * config.resolved_ffn_hidden()
    moe = config.moe
    k = {"top1": 1, "top2": 2}.get(moe.router, moe.capacity_factor)
    return D * moe.num_experts + k * 3 * D * (moe.expert_hidden or config.resolved_ffn_hidden())


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls only, as in PaLM's MFU; for MoE the
    active FLOPs (see ``ffn_active_params``)."""
    D, L, T = config.dim, config.num_layers, config.context
    ffn = sum(ffn_active_params(config, i) for i in range(L))
    matmul_params = L * 4 * D * D + ffn + config.vocab_size * D
    attention = L * 2 * T * D  # QK^T and AV, causal half counted as full like PaLM
    return 6 * matmul_params + 6 * attention
