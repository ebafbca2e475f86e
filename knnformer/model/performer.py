"""Performer attention (FAVOR+): softmax attention approximated by positive orthogonal random features, in time
and memory linear in the sequence length (Choromanski et al. 2021, "Rethinking Attention with Performers").

    softmax(q k^T / sqrt(Dh)) v  ~=  phi(q) (phi(k)^T v) / (phi(q) phi(k)^T 1)
    phi(x) = exp(W x' - |x'|^2 / 2),   x' = x / Dh^(1/4),   W (M, Dh): blocks of orthonormal rows, each row
    rescaled to a chi(Dh)-distributed norm, so that every row is marginally N(0, I) and E[phi(q).phi(k)] is the
    softmax kernel exp(q.k / sqrt(Dh)) (the 1/sqrt(M) of the paper cancels between numerator and denominator).

Stabilisation: a query's features are divided by their largest (a per-query constant, which cancels), and the
keys' by a running maximum over the keys seen so far, carried with the state and applied by rescaling it (as
flash attention carries its softmax maximum). Both are exact; the running maximum keeps the causal form causal.
Features are computed in fp32, also under bf16 autocast: exp() of bf16 logits loses about a quarter of its value.

Shape legend:
    B  batch        H  heads        T  sequence length      Dh head width
    M  random features per head     C  chunk length of the causal prefix sums
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from knnformer.config import ModelConfig, PerformerConfig

TINY = 1e-30  # floor of the denominator: a query whose features all underflowed reads zeros, not NaN


def orthogonal_features(num_features: int, head_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The projection W (M, Dh): Gaussian (Dh, Dh) blocks orthogonalised by QR, rows scaled by chi(Dh) norms."""
    blocks = []
    for _ in range(-(-num_features // head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator)
        q, r = torch.linalg.qr(gaussian)
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # signs fixed so the rows are Haar-distributed
    rows = torch.cat(blocks)[:num_features]  # (M, Dh), orthonormal within each block
    norms = torch.randn(num_features, head_dim, generator=generator).norm(dim=1)  # chi(Dh), as a Gaussian's norm
    return rows * norms[:, None]


def feature_logits(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """log phi(x): W x' - |x'|^2 / 2 for x (B, H, T, Dh), in fp32; (B, H, T, M)."""
    x = x.float() * x.shape[-1] ** -0.25
    return x @ projection.T - 0.5 * (x * x).sum(-1, keepdim=True)


def query_features(q: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """phi(q) (B, H, T, M), each query's features divided by their maximum (a constant that cancels)."""
    logits = feature_logits(q, projection)
    return torch.exp(logits - logits.detach().amax(-1, keepdim=True))


@dataclass
class FavorState:
    """What a causal Performer layer keeps of the keys and values seen so far: constant size, whatever the length.
    ``kv`` = sum of phi(k) v^T (B, H, M, Dh), ``k_sum`` = sum of phi(k) (B, H, M), both relative to
    exp(``k_max``) (B, H, 1, 1), the largest key feature logit so far."""

    kv: torch.Tensor
    k_sum: torch.Tensor
    k_max: torch.Tensor

    @classmethod
    def zeros(cls, B: int, H: int, M: int, Dh: int, device) -> "FavorState":
        return cls(torch.zeros(B, H, M, Dh, device=device), torch.zeros(B, H, M, device=device),
                   torch.full((B, H, 1, 1), -math.inf, device=device))


def causal_linear_attention(qf: torch.Tensor, k_logits: torch.Tensor, v: torch.Tensor, chunk: int,
                            state: FavorState | None = None) -> tuple[torch.Tensor, FavorState]:
    """Causal FAVOR+ by prefix sums, chunk by chunk: within a chunk the (C, C) masked feature products, before it
    the carried state. Memory is O(T M + (T / C) M Dh), never a (T, M, Dh) cumulative sum. Query features qf
    (B, H, T, M), key feature logits (B, H, T, M), values (B, H, T, Dh); returns (B, H, T, Dh) and the state after
    the last token, from which decoding continues."""
    B, H, T, M = qf.shape
    v = v.float()
    if state is None:
        state = FavorState.zeros(B, H, M, v.shape[-1], v.device)
    kv, k_sum, k_max = state.kv, state.k_sum, state.k_max
    outs = []
    # split, not slicing in a loop: the backward of each slice would zero-fill a full (B, H, T, M) gradient
    for qc, lc, vc in zip(qf.split(chunk, dim=2), k_logits.split(chunk, dim=2), v.split(chunk, dim=2)):
        new_max = torch.maximum(k_max, lc.detach().amax(dim=(-2, -1), keepdim=True))  # (B, H, 1, 1)
        rescale = torch.exp(k_max - new_max)  # 0 before the first key
        kv, k_sum, k_max = kv * rescale, k_sum * rescale[..., 0], new_max
        kf = torch.exp(lc - new_max)  # (B, H, C, M)
        scores = torch.tril(qc @ kf.transpose(-1, -2))  # (B, H, C, C): query i sees keys <= i of its chunk
        num = scores @ vc + qc @ kv  # (B, H, C, Dh)
        den = scores.sum(-1) + (qc @ k_sum[..., None])[..., 0]  # (B, H, C)
        outs.append(num / den.clamp_min(TINY)[..., None])
        kv = kv + kf.transpose(-1, -2) @ vc
        k_sum = k_sum + kf.sum(-2)
    return torch.cat(outs, dim=2), FavorState(kv, k_sum, k_max)


def linear_attention(qf: torch.Tensor, k_logits: torch.Tensor, v: torch.Tensor,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bidirectional FAVOR+: every query reads every key whose ``key_mask`` (B, T) is True. (B, H, T, Dh)."""
    if key_mask is not None:
        k_logits = k_logits.masked_fill(~key_mask[:, None, :, None], -math.inf)  # exp(-inf) = 0: padding unseen
    kf = torch.exp(k_logits - k_logits.detach().amax(dim=(-2, -1), keepdim=True))  # (B, H, T, M)
    kv = kf.transpose(-1, -2) @ v.float()  # (B, H, M, Dh)
    den = qf @ kf.sum(-2)[..., None]  # (B, H, T, 1)
    return (qf @ kv) / den.clamp_min(TINY)


class FavorAttention(nn.Module):
    """FAVOR+ over rotated q, k and v (B, H, T, Dh). The projection W is a buffer, saved with the weights, so a
    resumed run and generation use the features the model was trained with; ``redraw`` draws new ones."""

    def __init__(self, head_dim: int, config: PerformerConfig):
        super().__init__()
        self.chunk_size = config.chunk_size
        self.register_buffer("projection", orthogonal_features(config.num_features, head_dim))  # (M, Dh)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator) -> None:
        """Replace W by a fresh draw from ``generator`` (a seeded CPU generator, so runs reproduce)."""
        M, Dh = self.projection.shape
        self.projection.copy_(orthogonal_features(M, Dh, generator))

    def forward(self, q, k, v, causal: bool, state: FavorState | None = None, key_mask: torch.Tensor | None = None):
        """Attention output (B, H, T, Dh) in v's dtype, and the causal state after the last token (None when
        bidirectional). ``state`` continues a causal sequence: generation passes the state of the tokens before."""
        with torch.autocast(q.device.type, enabled=False):
            qf = query_features(q, self.projection)
            k_logits = feature_logits(k, self.projection)
            if causal:
                if key_mask is not None:
                    raise ValueError("a key mask is for bidirectional attention (model.causal: false)")
                y, state = causal_linear_attention(qf, k_logits, v, self.chunk_size, state)
            else:
                y, state = linear_attention(qf, k_logits, v, key_mask), None
        return y.to(v.dtype), state


@dataclass
class PerformerCache:
    """Generation state of a Performer decoder: one constant-size ``FavorState`` per layer in place of a KV cache
    (None until the layer's first tokens). ``length`` counts the tokens seen, for the rotary positions."""

    states: list[FavorState | None]
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch: int = 1, device=None, dtype=None) -> "PerformerCache":
        return cls([None] * config.num_layers)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.states if s is not None
                   for t in (s.kv, s.k_sum, s.k_max))


def redraw_features(model: nn.Module, generator: torch.Generator) -> int:
    """Redraw the random features of every Performer layer of ``model``; returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, FavorAttention)]
    for layer in layers:
        layer.redraw(generator)
    return len(layers)
