"""Sampling with temperature, top-k and top-p over a KV cache, streaming UTF-8 text as it is produced."""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch

from knnformer.model import KVCache, Transformer


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Next-token probabilities (B, V) from logits (B, V) after temperature, top-k and nucleus filtering."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.no_grad()
def sample_ids(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop_id: int | None = None) -> Iterator[int]:
    """Yield new token ids one by one. When the cache fills the context, it is rebuilt from the last half."""
    context = model.config.context
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) > context:
        raise ValueError(f"the prompt is {len(prompt)} tokens, longer than the model's context of {context}; "
                         f"shorten it")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    ids = list(prompt)
    cache = KVCache.empty(model.config, 1, device, next(model.parameters()).dtype)
    logits, _ = model(torch.tensor([ids], device=device), cache=cache)
    for _ in range(max_new_tokens):
        last = logits[:, -1]
        if temperature == 0:
            next_id = int(last.argmax(-1))
        else:
            probs = filter_logits(last, temperature, top_k, top_p)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        yield next_id
        if stop_id is not None and next_id == stop_id:
            return
        ids.append(next_id)
        if cache.length >= context:
            keep = ids[-(context // 2):]
            cache = KVCache.empty(model.config, 1, device, next(model.parameters()).dtype)
            logits, _ = model(torch.tensor([keep], device=device), cache=cache)
        else:
            logits, _ = model(torch.tensor([[next_id]], device=device), cache=cache)


def stream_text(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Decode token ids to text incrementally, never splitting a UTF-8 character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for i in ids:
        piece = decoder.decode(tokenizer.id_to_bytes(i))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
