"""RETRO: a bidirectional neighbour encoder and chunked cross-attention (CCA), exactly causal.

Shape legend:
    B  batch          T  decoder tokens (= n * C)      C  chunk size       n  chunks in the window
    S  slots (= n + 1): slot 0 holds the neighbours of the chunk just before the window, slot s >= 1 those of
       the window's chunk s - 1
    K  neighbours per slot      R  tokens per neighbour (C, or 2C with its continuation)
    D  decoder width            De encoder width          H  heads

Causality. Slot s's neighbours were retrieved with the text of window chunk s - 1, which ends at position
s*C - 1. They serve the decoder positions s*C - 1 .. s*C + C - 2: from the last token of the retrieving chunk up
to the token before the last of the next one (RETRO's CCA). So no position ever reads neighbours retrieved with
text it has not seen. Slot 0 serves positions 0 .. C - 2 with neighbours of text before the window, so the
window's first chunk is not left without retrieval. The encoder of slot s >= 1 reads the decoder's states of
chunk s - 1 (positions <= s*C - 1); slot 0 reads zeros.

Implementation: left-pad the decoder states by one position and right-pad by C - 1, so that position p lands at
p + 1 and slot s covers padded positions s*C .. s*C + C - 1; then one batched attention over (B*S) slots.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from knnformer.config import ModelConfig, RetrievalConfig
from knnformer.model.layers import RMSNorm, SwiGLU, apply_rotary, rotary_tables


def attend_with_null(q, k, v, mask=None, bias=None):
    """SDPA with one extra all-zero key and value that is always visible: a query whose real keys are all masked
    (a slot without neighbours) gets a zero output instead of NaN. q (N, H, Lq, Dh), k/v (N, H, Lk, Dh),
    mask (N, Lk) bool, True = visible; bias (H, Lq, Lk), or (N or 1, H or 1, Lq or 1, Lk), added to the logits."""
    N, H, Lq, Dh = q.shape
    zeros = k.new_zeros(N, H, 1, Dh)
    k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(N, 1)], dim=1)[:, None, None, :]  # (N, 1, 1, Lk + 1)
    if bias is not None:
        bias = F.pad(bias, (0, 1)).to(q.dtype)
        bias = bias[None] if bias.dim() == 3 else bias  # (1 or N, H, Lq, Lk + 1)
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        mask = bias
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # as model.attend: CPU attention's bf16 backward is several times slower than fp32's (measured: 48 of
        # 115 ms of a bf16 RETRO step), so it runs in fp32
        with torch.autocast("cpu", enabled=False):
            mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CrossAttention(nn.Module):
    """Queries from width ``dim``, keys and values from width ``kv_dim``."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, memory, mask=None, rotary_q=None, rotary_k=None, bias=None):
        """x (N, Lq, dim), memory (N, Lk, kv_dim), mask (N, Lk) -> (N, Lq, dim). ``rotary_q`` and ``rotary_k``
        are (cos, sin) tables (Lq, Dh) and (Lk, Dh) giving queries and keys relative positions; ``bias``
        (H, Lq, Lk) is added to the attention logits."""
        N, Lq, D = x.shape
        H = self.num_heads
        q = self.q(x).view(N, Lq, H, D // H).transpose(1, 2)
        k, v = self.kv(memory).view(N, memory.shape[1], 2, H, D // H).permute(2, 0, 3, 1, 4)
        if rotary_q is not None:
            q, k = apply_rotary(q, *rotary_q), apply_rotary(k, *rotary_k)
        y = attend_with_null(q, k, v, mask, bias)
        return self.proj(y.transpose(1, 2).reshape(N, Lq, D))


class EncoderBlock(nn.Module):
    """Bidirectional self-attention over one neighbour, cross-attention to the retrieving chunk, SwiGLU."""

    def __init__(self, dim: int, decoder_dim: int, num_heads: int, norm_eps: float, condition: bool):
        super().__init__()
        self.num_heads = num_heads
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.cross_norm = RMSNorm(dim, norm_eps) if condition else None
        self.cross = CrossAttention(dim, decoder_dim, num_heads) if condition else None
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = SwiGLU(ModelConfig(dim=dim, num_heads=num_heads, norm_eps=norm_eps))

    def forward(self, x, cos, sin, mask, chunk_states, K: int = 1):
        """x (N, R, De) with N = B*S*K, mask (N, R), chunk_states (B*S, C, D) or None."""
        N, R, De = x.shape
        H = self.num_heads
        q, k, v = self.qkv(self.attn_norm(x)).view(N, R, 3, H, De // H).permute(2, 0, 3, 1, 4)  # (N, H, R, Dh)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = attend_with_null(q, k, v, mask)
        x = x + self.proj(y.transpose(1, 2).reshape(N, R, De))
        if self.cross is not None and chunk_states is not None:
            # the K neighbours of a slot read the same chunk: fold them into the query length, so the chunk's
            # keys and values are projected once per slot, not once per neighbour
            y = self.cross(self.cross_norm(x).view(N // K, K * R, De), chunk_states)
            x = x + y.view(N, R, De)
        return x + self.ffn(self.ffn_norm(x))


class Retrieval(nn.Module):
    """The neighbour encoder and the chunked cross-attention layers of a RETRO decoder."""

    def __init__(self, model: ModelConfig, config: RetrievalConfig, retriever_input_dim: int = 0):
        super().__init__()
        self.chunk_size = config.chunk_size
        self.layers = config.resolved_layers(model.num_layers)
        self.condition = config.condition_encoder
        enc_dim, enc_heads = config.resolved_encoder(model)
        self.encoder_in = nn.Linear(model.dim, enc_dim, bias=False)  # from the shared token embeddings
        self.encoder = nn.ModuleList(EncoderBlock(enc_dim, model.dim, enc_heads, model.norm_eps,
                                                  config.condition_encoder) for _ in range(config.encoder_layers))
        self.encoder_norm = RMSNorm(enc_dim, model.norm_eps)
        self.cca_norms = nn.ModuleDict({str(i): RMSNorm(model.dim, model.norm_eps) for i in self.layers})
        self.cca = nn.ModuleDict({str(i): CrossAttention(model.dim, enc_dim, model.num_heads) for i in self.layers})
        # a learned bias per head between slot position i and neighbour position j (RETRO's CCA is relative-
        # position aware): it lets a layer learn to read the continuation token aligned with i from the start
        self.cca_bias = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(model.num_heads, config.chunk_size,
                                                                           2 * config.chunk_size))
                                          for i in self.layers})
        # positions 0 .. 2C - 1 inside a neighbour (with its continuation), for the encoder and for CCA's keys
        cos, sin = rotary_tables(2 * config.chunk_size, enc_dim // enc_heads, model.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        cos, sin = rotary_tables(2 * config.chunk_size, model.dim // model.num_heads, model.rope_theta)
        self.register_buffer("cca_cos", cos, persistent=False)
        self.register_buffer("cca_sin", sin, persistent=False)
        self.retriever = None
        if config.retriever.kind == "learned":
            from knnformer.model.retriever import LearnedRetriever

            self.retriever = LearnedRetriever(model, config, retriever_input_dim)

    def encode(self, neighbour_embeddings: torch.Tensor, mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """neighbour_embeddings (B, S, K, R, D), mask (B, S, K, R), decoder states h (B, T, D)
        -> encoded neighbours (B, S, K, R, De)."""
        B, S, K, R, D = neighbour_embeddings.shape
        C = self.chunk_size
        x = self.encoder_in(neighbour_embeddings).view(B * S * K, R, -1)
        flat_mask = mask.reshape(B * S * K, R)
        states = None
        if self.condition:
            # slot s >= 1 reads the decoder's states of window chunk s - 1; slot 0 (before the window) reads zeros
            chunks = h[:, : (S - 1) * C].reshape(B, S - 1, C, D)
            chunks = torch.cat([chunks.new_zeros(B, 1, C, D), chunks], dim=1)  # (B, S, C, D)
            states = chunks.reshape(B * S, C, D)
        cos, sin = self.rope_cos[:R], self.rope_sin[:R]
        for block in self.encoder:
            x = block(x, cos, sin, flat_mask, states, K)
        return self.encoder_norm(x).view(B, S, K, R, -1)

    def cross_attend(self, layer: int, h: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor,
                     relevance: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder states h (B, T, D) attend, chunk by chunk, to encoded (B, S, K, R, De); returns the new h.
        ``relevance`` (B, S, K), a learned retriever's cosines, adds ``beta * relevance`` to each neighbour's logits."""
        B, T, D = h.shape
        C = self.chunk_size
        S = T // C + 1
        x = F.pad(self.cca_norms[str(layer)](h), (0, 0, 1, S * C - T - 1))  # (B, S*C, D): position p at p + 1
        K, R = encoded.shape[2], encoded.shape[3]
        memory = encoded.reshape(B * S, K * R, encoded.shape[-1])  # (B*S, K*R, De)
        # relative positions: slot position i predicts the token that sits at position C + i of a neighbour
        # (i of its continuation) when the neighbour matches the retrieving chunk, so queries sit at C + i
        rotary_q = (self.cca_cos[C : 2 * C], self.cca_sin[C : 2 * C])
        rotary_k = (self.cca_cos[:R].repeat(K, 1), self.cca_sin[:R].repeat(K, 1))
        bias = self.cca_bias[str(layer)][:, :, :R].repeat(1, 1, K)  # (H, C, K*R)
        if relevance is not None:
            bias = bias + self.retriever.bias(relevance, R)  # (B*S, H, C, K*R)
        y = self.cca[str(layer)](x.view(B * S, C, D), memory, mask.reshape(B * S, -1), rotary_q, rotary_k, bias)
        return h + y.view(B, S * C, D)[:, 1 : T + 1]
