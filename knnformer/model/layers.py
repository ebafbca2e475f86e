"""The decoder's building blocks: RMSNorm, rotary position tables, self-attention (exact softmax through SDPA, or
Performer's FAVOR+) with its generation cache, the SwiGLU feed-forward (or a Mixture-of-Experts of them), the
pre-norm ``Block`` and the GPT-2 style weight initialisation.

They sit apart from ``transformer.py``, which assembles them into the decoder, because three models share them:
the decoder, RETRO's neighbour encoder and cross-attention (``retro.py``, which the decoder itself imports) and
the LRA encoder (``experiments/lra.py``). Like all of ``model``, they read only the config: no data, retrieval
or run code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from knnformer.config import ModelConfig
from knnformer.model.moe import MoE
from knnformer.model.performer import FavorAttention, PerformerCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(context: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, each (context, Dh)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context, dtype=torch.float32), inv_freq)  # (context, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (context, Dh)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + Dh/2) of x (B, H, T, Dh) by the angles of its positions (T, Dh).

    Any layout works whose last dimension is Dh and that ``cos`` and ``sin`` broadcast against, such as
    (B, T, 2, H, Dh) with tables viewed as (T, 1, 1, Dh): queries and keys are then rotated in one pass.
    """
    half = x.shape[-1] // 2
    # x * cos + [-x2, x1] * sin, with [-x2, x1] as a roll of x by half times a sign: 4 kernels on x, not 6
    sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # on the small table, not on x
    return x * cos + torch.roll(x, half, dims=-1) * sin_signed


def rotate_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` on the queries and keys of qkv (B, T, 3, H, Dh), values passed through unchanged.

    One pass over all of qkv, with the tables extended by the identity rotation (cos 1, sin 0) for the values:
    its backward is then a single stack of the q, k, v gradients, where rotating a slice of qkv costs slice and
    select backwards that zero-fill and add full-size buffers.
    """
    half = cos.shape[-1] // 2
    sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # (T, Dh)
    # (T, 3, 1, Dh), or (B, T, 3, 1, Dh) for per-row tables (B, T, Dh) (a batch of rows at different positions)
    cos3 = torch.stack([cos, cos, torch.ones_like(cos)], dim=-2)[..., None, :]
    sin3 = torch.stack([sin_signed, sin_signed, torch.zeros_like(sin)], dim=-2)[..., None, :]
    return qkv * cos3 + torch.roll(qkv, half, dims=-1) * sin3


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, one (B, H, context, Dh) pair per layer.

    ``length`` is the tokens seen by every row (an int), or a (B,) tensor of each row's own count for a batch of
    rows at different positions (continuous batching), which steps one token at a time. ``retrieval``: a retrieval
    model's per-slot state (``retro.RetrievalCache``), or None."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int | torch.Tensor = 0
    retrieval: object = None

    def rows(self, index: slice) -> KVCache:
        """A view of rows ``index`` (a slice): writes through it land in this cache."""
        length = self.length[index] if isinstance(self.length, torch.Tensor) else self.length
        return KVCache([k[index] for k in self.keys], [v[index] for v in self.values], length,
                       None if self.retrieval is None else self.retrieval.rows(index))

    def copy_row(self, src: int, dst: int) -> None:
        """Row ``src``'s keys, values, length and retrieval state copied onto row ``dst``."""
        for t in (*self.keys, *self.values):
            t[dst] = t[src]
        if isinstance(self.length, torch.Tensor):
            self.length[dst] = self.length[src]
        if self.retrieval is not None:
            self.retrieval.copy_row(src, dst)

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, device, dtype) -> "KVCache":
        shape = (batch, config.num_heads, config.context, config.dim // config.num_heads)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)])


def empty_cache(config: ModelConfig, batch: int, device, dtype) -> "KVCache | PerformerCache":
    """The generation state of a decoder: a KV cache for softmax attention, running sums for a Performer."""
    if not config.causal:
        raise ValueError("a bidirectional model (model.causal: false) cannot generate")
    if config.attention == "performer":
        return PerformerCache.empty(config, batch, device, dtype)
    return KVCache.empty(config, batch, device, dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, causal: bool = True,
           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of q, k, v (B, H, T, Dh): causal, or bidirectional over the keys whose ``key_mask``
    (B, T) is True. Under CPU bf16 autocast it runs in fp32: CPU flash attention's backward is about 4x slower in
    bf16 than in fp32 (torch 2.4 - 2.13), and attention is a small share of the FLOPs. q, k and v leave the rotary
    in fp32 already (bf16 qkv times fp32 tables), so this casts nothing."""
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T)
    if causal and mask is not None:
        raise ValueError("a key mask is for bidirectional attention (model.causal: false)")
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal,
                                                  dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)
        self.dropout = config.dropout
        self.causal = config.causal
        self.favor = None
        if config.attention == "performer":
            self.favor = FavorAttention(config.dim // config.num_heads, config.performer)

    def forward(self, x, cos, sin, cache: KVCache | PerformerCache | None = None, layer: int = 0,
                key_mask: torch.Tensor | None = None):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, Dh)
        q, k, v = (t.transpose(1, 2) for t in rotate_qkv(qkv, cos, sin).unbind(2))  # (B, H, T, Dh) each
        if self.favor is not None:
            state = cache.states[layer] if cache is not None else None
            y, state = self.favor(q, k, v, self.causal, state, key_mask)
            if cache is not None:
                cache.states[layer] = state
        elif cache is None:
            y = attend(q, k, v, self.dropout if self.training else 0.0, self.causal, key_mask)
        elif isinstance(cache.length, torch.Tensor):  # rows at their own positions, one token each
            pos = cache.length  # (B,)
            rows = torch.arange(B, device=x.device)
            cache.keys[layer][rows, :, pos] = k[:, :, 0]
            cache.values[layer][rows, :, pos] = v[:, :, 0]
            L = int(pos.max()) + 1
            visible = torch.arange(L, device=x.device)[None, :] <= pos[:, None]  # (B, L)
            y = F.scaled_dot_product_attention(q, cache.keys[layer][:, :, :L], cache.values[layer][:, :, :L],
                                               attn_mask=visible[:, None, None, :])
        else:
            start = cache.length
            cache.keys[layer][:, :, start : start + T] = k
            cache.values[layer][:, :, start : start + T] = v
            k, v = cache.keys[layer][:, :, : start + T], cache.values[layer][:, :, : start + T]
            # query i (absolute position start + i) sees keys 0 .. start + i
            mask = None
            if T > 1:
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return F.dropout(self.proj(y), self.dropout, self.training)


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.resolved_ffn_hidden()
        self.gate_up = nn.Linear(config.dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, config.dim, bias=False)
        self.dropout = config.dropout

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, F) each
        return F.dropout(self.down(F.silu(gate) * up), self.dropout, self.training)


def make_ffn(config: ModelConfig, layer: int) -> nn.Module:
    """The feed-forward of block ``layer``: SwiGLU, or a Mixture-of-Experts of SwiGLUs where ``model.ffn`` is
    ``moe`` and ``model.moe.every`` puts one in this block."""
    return MoE(config) if config.is_moe_layer(layer) else SwiGLU(config)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = SelfAttention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = make_ffn(config, layer)

    def forward(self, x, cos, sin, cache=None, layer=0, key_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, key_mask)
        return x + self.ffn(self.ffn_norm(x))


def init_weights(module: nn.Module, config: ModelConfig) -> None:
    """Normal(0, init_std) matrices, the residual projections scaled down by depth as in GPT-2."""
    for name, p in module.named_parameters():
        if p.dim() == 2 or name.endswith(("experts_gate_up", "experts_down")):  # MoE experts: stacked (E, ., .)
            residual = name.endswith(("proj.weight", "down.weight", "experts_down"))
            scale = math.sqrt(2 * config.num_layers) if residual else 1
            nn.init.normal_(p, mean=0.0, std=config.init_std / scale)
