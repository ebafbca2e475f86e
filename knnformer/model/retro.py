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

Generation (``RetrievalCache``, ``prepare_slots``, ``cross_attend_cached``): the same rule one position at a time.
Position p reads slot (p + 1) // C at place (p + 1) % C; a slot is encoded when its first position p = s*C - 1
arrives, which is the last token of the chunk that retrieved it (so its encoder's chunk states exist by then),
and its keys and values are kept for the positions after. The logits equal the full forward's.
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
        k, v = self.memory_kv(memory, rotary_k if rotary_q is not None else None)
        return self.attend_kv(x, k, v, mask, rotary_q, bias)

    def memory_kv(self, memory, rotary_k=None):
        """Keys and values (N, H, Lk, Dh) of memory (N, Lk, kv_dim), keys rotated by ``rotary_k``: what a
        generation cache keeps per slot so that later tokens do not project the neighbours again."""
        N, Lk, _ = memory.shape
        H, D = self.num_heads, self.q.out_features
        k, v = self.kv(memory).view(N, Lk, 2, H, D // H).permute(2, 0, 3, 1, 4)
        if rotary_k is not None:
            k = apply_rotary(k, *rotary_k)
        return k, v

    def attend_kv(self, x, k, v, mask=None, rotary_q=None, bias=None):
        """x (N, Lq, dim) attends to projected keys and values (N, H, Lk, Dh) -> (N, Lq, dim); ``rotary_q`` may be
        per query row, (N, 1, 1, Dh) tables."""
        N, Lq, D = x.shape
        H = self.num_heads
        q = self.q(x).view(N, Lq, H, D // H).transpose(1, 2)
        if rotary_q is not None:
            q = apply_rotary(q, *rotary_q)
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
        states = None
        if self.condition:
            # slot s >= 1 reads the decoder's states of window chunk s - 1; slot 0 (before the window) reads zeros
            chunks = h[:, : (S - 1) * C].reshape(B, S - 1, C, D)
            chunks = torch.cat([chunks.new_zeros(B, 1, C, D), chunks], dim=1)  # (B, S, C, D)
            states = chunks.reshape(B * S, C, D)
        encoded = self.encode_slots(neighbour_embeddings.reshape(B * S, K, R, D), mask.reshape(B * S, K, R), states)
        return encoded.view(B, S, K, R, -1)

    def encode_slots(self, neighbour_embeddings: torch.Tensor, mask: torch.Tensor,
                     states: torch.Tensor | None) -> torch.Tensor:
        """N slots at once: neighbour_embeddings (N, K, R, D), mask (N, K, R), the decoder states of each slot's
        retrieving chunk (N, C, D) (zeros for slot 0; None without a conditioned encoder) -> (N, K, R, De)."""
        N, K, R, _ = neighbour_embeddings.shape
        x = self.encoder_in(neighbour_embeddings).view(N * K, R, -1)
        flat_mask = mask.reshape(N * K, R)
        cos, sin = self.rope_cos[:R], self.rope_sin[:R]
        for block in self.encoder:
            x = block(x, cos, sin, flat_mask, states if self.condition else None, K)
        return self.encoder_norm(x).view(N, K, R, -1)

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

    def prepare_slots(self, decoder, cache: RetrievalCache, idx: torch.Tensor, h: torch.Tensor,
                      pos: torch.Tensor) -> None:
        """At the first CCA layer of a cached step over tokens idx (B, T) at positions pos (B, T) with states h
        (B, T, D): keep their ids and states, then encode every registered slot that a new position is the first
        to read (slot (p + 1) // C serves position p), and keep its keys and values for each CCA layer."""
        C = self.chunk_size
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
        cache.ids[rows, pos] = idx
        if cache.states is not None:
            cache.states[rows, pos] = h
        last = (pos[:, -1] + 1) // C  # (B,) the furthest slot a new position reads
        slots = torch.arange(cache.num_slots, device=idx.device)
        need = cache.have & ~cache.encoded & (slots[None, :] <= last[:, None])
        if not bool(need.any()):
            return
        b, s = need.nonzero().unbind(1)  # (N,) each
        chunk_pos = (s - 1).clamp(min=0)[:, None] * C + torch.arange(C, device=idx.device)  # (N, C)
        states = None
        if self.condition:  # slot s >= 1 reads the states of chunk s - 1; slot 0 (before the window) reads zeros
            states = torch.where((s > 0)[:, None, None], cache.states[b[:, None], chunk_pos], 0.0)
        tokens, mask = cache.tokens[b, s], cache.mask[b, s]  # (N, K, R)
        N, K, R = tokens.shape
        memory = self.encode_slots(decoder.embed(tokens), mask, states).reshape(N, K * R, -1)
        rotary_k = (self.cca_cos[:R].repeat(K, 1), self.cca_sin[:R].repeat(K, 1))
        for layer in self.layers:
            k, v = self.cca[str(layer)].memory_kv(memory, rotary_k)  # (N, H, K*R, Dh)
            cache.keys[str(layer)][b, s] = k
            cache.values[str(layer)][b, s] = v
        if self.retriever is not None:
            r = self.retriever
            if r.reads_embedder:
                q, z = r.project(cache.query_vectors[b, s].float()), r.project(cache.neighbour_vectors[b, s].float())
            else:
                z = r.embed(decoder, tokens[..., :C].reshape(-1, C), mask[..., :C].reshape(-1, C)).view(N, K, -1)
                q = r.embed(decoder, cache.ids[b[:, None], chunk_pos], torch.ones(N, C, dtype=torch.bool,
                                                                                   device=idx.device))
                q = torch.where((s > 0)[:, None], q, 0.0)  # slot 0's query chunk lies before the window
            cache.relevance[b, s] = torch.einsum("nd,nkd->nk", q, z)
        cache.encoded[b, s] = True

    def cross_attend_cached(self, layer: int, h: torch.Tensor, cache: RetrievalCache, pos: torch.Tensor,
                            aligned: bool = False) -> torch.Tensor:
        """``cross_attend`` for new states h (B, T, D) at positions pos (B, T), reading each position's slot from
        the cache: one query per position, so rows may sit at different positions. ``aligned``: every row's
        positions are the same run start .. start + T - 1 (a prefill, or a cache stepped together): the queries
        are then laid out slot by slot, as in ``cross_attend``, and read the cache's slots in place, instead of
        gathering a slot's keys and values for every position (T copies of K * R keys per row and layer)."""
        B, T, D = h.shape
        C, K, R = self.chunk_size, cache.K, cache.R
        if aligned:
            return self._cross_attend_aligned(layer, h, cache, int(pos[0, 0]) if T else 0)
        b = torch.arange(B, device=h.device)[:, None].expand(B, T).reshape(-1)
        s = ((pos + 1) // C).reshape(-1)  # (N,) the slot serving each position
        i = ((pos + 1) % C).reshape(-1)  # (N,) its place in the slot
        N = B * T
        mask = cache.mask[b, s].reshape(N, K * R) & cache.encoded[b, s][:, None]
        rotary_q = (self.cca_cos[C + i][:, None, None, :], self.cca_sin[C + i][:, None, None, :])
        bias = self.cca_bias[str(layer)][:, i, :R].permute(1, 0, 2).repeat(1, 1, K)[:, :, None, :]  # (N, H, 1, K*R)
        if self.retriever is not None:
            bias = bias + self.retriever.bias(cache.relevance[b, s][:, None, :], R)  # (N, 1, 1, K*R)
        x = self.cca_norms[str(layer)](h).reshape(N, 1, D)
        y = self.cca[str(layer)].attend_kv(x, cache.keys[str(layer)][b, s], cache.values[str(layer)][b, s], mask,
                                           rotary_q, bias)
        return h + y.view(B, T, D)

    def _cross_attend_aligned(self, layer: int, h: torch.Tensor, cache: RetrievalCache, start: int) -> torch.Tensor:
        """``cross_attend_cached`` for positions start .. start + T - 1 in every row: position p sits at place
        (p + 1) % C of slot (p + 1) // C, so the queries pad to whole slots s0 .. s1 and each slot's C places
        attend to its cached keys at once."""
        B, T, D = h.shape
        C, K, R = self.chunk_size, cache.K, cache.R
        s0, first = divmod(start + 1, C)
        s1 = (start + T) // C
        n = s1 - s0 + 1
        x = F.pad(self.cca_norms[str(layer)](h), (0, 0, first, n * C - T - first))  # (B, n*C, D)
        keys = cache.keys[str(layer)][:, s0 : s1 + 1].reshape(B * n, *cache.keys[str(layer)].shape[2:])
        values = cache.values[str(layer)][:, s0 : s1 + 1].reshape(B * n, *cache.values[str(layer)].shape[2:])
        mask = (cache.mask[:, s0 : s1 + 1].reshape(B * n, K * R)
                & cache.encoded[:, s0 : s1 + 1].reshape(B * n, 1))
        rotary_q = (self.cca_cos[C : 2 * C], self.cca_sin[C : 2 * C])
        bias = self.cca_bias[str(layer)][:, :, :R].repeat(1, 1, K)  # (H, C, K*R)
        if self.retriever is not None:
            bias = bias + self.retriever.bias(cache.relevance[:, s0 : s1 + 1], R)  # (B*n, H, C, K*R)
        y = self.cca[str(layer)].attend_kv(x.view(B * n, C, D), keys, values, mask, rotary_q, bias)
        return h + y.view(B, n * C, D)[:, first : first + T]


class RetrievalCache:
    """A retrieval model's generation state beside its KV cache, for B rows and the S = context // C + 1 slots of a
    window that starts at the cache's position 0 on the chunk grid (slot s: the neighbours retrieved with window
    chunk s - 1; slot 0 those of the chunk before the window).

    The caller registers a slot's neighbours (``put``) as soon as they are retrieved; the model encodes a slot when
    the first position it serves arrives (``Retrieval.prepare_slots``) and keeps its keys and values for every CCA
    layer, so later tokens attend to them without encoding or projecting again. A slot never registered reads
    nothing (as a masked slot in the full forward). With a conditioned encoder the first CCA layer's decoder states
    are kept (a slot's encoder reads its retrieving chunk's), and with a learned retriever the window's ids (its
    query chunks) or the frozen vectors, and each slot's relevance. Memory: per CCA layer 2 * B * S * K * R * D
    floats, plus B * context * D for the states."""

    def __init__(self, retrieval: Retrieval, model: ModelConfig, batch: int, K: int, R: int, device, dtype,
                 vector_dim: int = 0):
        C, D, H = retrieval.chunk_size, model.dim, model.num_heads
        if R not in (C, 2 * C):
            raise ValueError(f"neighbours of {R} tokens: a model with chunk size {C} reads {C} or {2 * C}")
        self.K, self.R, self.num_slots = K, R, model.context // C + 1
        B, S = batch, self.num_slots
        self.tokens = torch.zeros(B, S, K, R, dtype=torch.long, device=device)
        self.mask = torch.zeros(B, S, K, R, dtype=torch.bool, device=device)
        self.have = torch.zeros(B, S, dtype=torch.bool, device=device)
        self.encoded = torch.zeros(B, S, dtype=torch.bool, device=device)
        self.ids = torch.zeros(B, model.context, dtype=torch.long, device=device)
        self.states = torch.zeros(B, model.context, D, device=device, dtype=dtype) if retrieval.condition else None
        kv = (B, S, H, K * R, D // H)
        self.keys = {str(i): torch.zeros(kv, device=device, dtype=dtype) for i in retrieval.layers}
        self.values = {str(i): torch.zeros(kv, device=device, dtype=dtype) for i in retrieval.layers}
        learned = retrieval.retriever is not None
        self.relevance = torch.zeros(B, S, K, device=device) if learned else None
        reads = learned and retrieval.retriever.reads_embedder
        if reads and vector_dim <= 0:
            raise ValueError("this model's learned retriever reads the frozen embedder: give the vectors' width")
        self.query_vectors = torch.zeros(B, S, vector_dim, device=device) if reads else None
        self.neighbour_vectors = torch.zeros(B, S, K, vector_dim, device=device) if reads else None

    def _tensors(self) -> dict:
        return {name: value for name, value in vars(self).items() if isinstance(value, (torch.Tensor, dict))}

    def rows(self, index: slice) -> RetrievalCache:
        """A view of rows ``index``: writes through it land here."""
        view = object.__new__(RetrievalCache)
        view.K, view.R, view.num_slots = self.K, self.R, self.num_slots
        for name, value in self._tensors().items():
            setattr(view, name, {k: t[index] for k, t in value.items()} if isinstance(value, dict) else value[index])
        for name, value in vars(self).items():
            if value is None:
                setattr(view, name, None)
        return view

    def copy_row(self, src: int, dst: int) -> None:
        for value in self._tensors().values():
            for t in value.values() if isinstance(value, dict) else (value,):
                t[dst] = t[src]

    def clear(self, row: int) -> None:
        """Forget row ``row``'s slots (a new sequence, or a window moved on)."""
        self.have[row] = False
        self.encoded[row] = False
        self.mask[row] = False

    def put(self, row: int, slot: int, tokens: torch.Tensor, mask: torch.Tensor,
            vectors: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Register slot ``slot`` of row ``row``: neighbour tokens and mask (K, R), and for a learned retriever
        reading the frozen embedder its query chunk's vector (De,) and the neighbours' (K, De)."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside the window's {self.num_slots} slots")
        self.tokens[row, slot] = tokens
        self.mask[row, slot] = mask
        if self.query_vectors is not None:
            if vectors is None:
                raise ValueError("this model's learned retriever reads the frozen embedder: pass the vectors")
            self.query_vectors[row, slot], self.neighbour_vectors[row, slot] = vectors
        self.have[row, slot] = True
        self.encoded[row, slot] = False
