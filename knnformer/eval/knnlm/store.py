"""kNN-LM's store of keys: the hidden states of every train position and the train token that followed each.

One store per run, in ``RUN/knnlm/``::

    manifest.json        what built it (``identity``: checkpoint step and sha256 of its weights, datastore corpus
                         sha256 and tokenizer, how the hidden states were computed: windows, dtype, retrieval),
                         count, width, and the approximate indexes built over it so far
    keys.f16             (N, D) fp16 hidden states of every train position, memory-mapped
    values.npy           (N,) the train token that followed each key

Keys are computed with evaluation's windows (consecutive windows of the context, every train position once), so
a key has the history a scored position has. A store is reused while its manifest's identity equals the run's
(``store_identity``) and rebuilt otherwise, in a temporary folder that replaces the old one when complete
(``knnformer.io.writing_folder``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from knnformer.data.datastore import Datastore
from knnformer.eval.scoring import NeighbourFn, window_batches, window_plan
from knnformer.io import file_sha256, writing_folder
from knnformer.model.transformer import Transformer
from knnformer.runtime import autocast

logger = logging.getLogger(__name__)

STORE_DIR = "knnlm"
FORMAT_VERSION = 1

Progress = Callable[[int], None]
ProgressFactory = Callable[[int, str], Progress]


@torch.no_grad()
def split_hidden_states(model: Transformer, tokens: np.ndarray, out: np.ndarray, batch_size: int = 32,
                        dtype: str = "float32", neighbours: NeighbourFn | None = None,
                        progress: Progress | None = None, logprobs: bool = False) -> np.ndarray | None:
    """Write into ``out[p - 1]`` (an (N - 1, D) array, e.g. a memory map) the final hidden state that predicts
    token p, for p = 1 .. N - 1, over evaluation's consecutive windows of the context (batched as
    ``score_tokens`` batches them). With ``logprobs``, also return log p_lm(token p) as a float64 (N - 1,)
    array, the very values ``score_tokens`` turns into losses."""
    context = model.config.context
    model.eval()
    device = next(model.parameters()).device
    plan = window_plan(len(tokens), context, context)
    logp = np.zeros(max(0, len(tokens) - 1), dtype=np.float64) if logprobs else None
    for group, n, x, y, inputs in window_batches(tokens, plan, batch_size, neighbours, device):
        with autocast(dtype, device):
            h = model.hidden_states(x, **inputs)  # (B, n, D)
            logits = F.linear(h, model.embed.weight) if logprobs else None  # (B, n, V), as Transformer.forward
        h = h.float().cpu().numpy()
        if logprobs:
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
            losses = losses.view(len(group), n).cpu().double().numpy()
        for row, (begin, first, _) in enumerate(group):
            out[begin + first : begin + n] = h[row, first:]
            if logprobs:
                logp[begin + first : begin + n] = -losses[row, first:]
        if progress is not None:
            progress(sum(g[2] - g[1] for g in group))
    return logp


@dataclass
class KnnStore:
    """Keys (fp16, memory-mapped) and values of a run's kNN-LM store."""

    path: Path
    manifest: dict
    keys: np.ndarray
    values: np.ndarray

    @property
    def num_keys(self) -> int:
        return len(self.values)

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    @classmethod
    def open(cls, path: str | Path) -> "KnnStore":
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            n, d = manifest["num_keys"], manifest["dim"]
            keys = np.memmap(path / "keys.f16", dtype=np.float16, mode="r", shape=(n, d))
            values = np.load(path / "values.npy")
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"the kNN-LM store {path} is incomplete or corrupt ({e}); delete it to rebuild") from None
        if len(values) != n:
            raise ValueError(f"the kNN-LM store {path} holds {len(values)} values for {n} keys; delete it to rebuild")
        return cls(path, manifest, keys, values)


def store_identity(record: dict, ckpt_path: Path, store: Datastore, retrieval: dict | None,
                   dtype: str, context: int) -> dict[str, Any]:
    """What the keys depend on: the weights, the train tokens, the windows and, for a retrieval model, the
    neighbours it read. A store whose manifest holds another identity is rebuilt."""
    ckpt_path = Path(ckpt_path)
    sums_path = ckpt_path / "checksums.json"
    sums = json.loads(sums_path.read_text()) if sums_path.is_file() else {}
    weights_sha = sums.get("model.safetensors") or file_sha256(ckpt_path / "model.safetensors")
    lo, hi = store.split_range("train")
    return {
        "format_version": FORMAT_VERSION,
        "checkpoint": {"step": int(ckpt_path.name.split("-")[1]), "weights_sha256": weights_sha},
        "datastore": {"corpus_sha256": store.manifest["corpus_sha256"],
                      "tokenizer_fingerprint": store.manifest["tokenizer"]["fingerprint"], "train": [lo, hi]},
        "hidden": {"windows": "consecutive", "context": context, "dtype": dtype, "retrieval": retrieval},
    }


def _mismatch(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first key path where two identities differ, or None."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _mismatch(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}"
    return None


def _reusable(final: Path, identity: dict) -> KnnStore | None:
    """The store at ``final`` when its identity is ``identity``; None (and why, logged) when it must be rebuilt."""
    try:
        old = KnnStore.open(final)
    except ValueError as e:
        logger.info("rebuilding the kNN-LM store: %s", e)
        return None
    why = _mismatch(old.manifest.get("identity", {}), identity)
    if why is None:
        return old
    logger.info("rebuilding the kNN-LM store %s: %s changed", final, why)
    return None


def open_or_build_store(run_dir: str | Path, model: Transformer, identity: dict, train_tokens: np.ndarray,
                        batch_size: int = 32, dtype: str = "float32", neighbours: NeighbourFn | None = None,
                        progress: Progress | None = None, force: bool = False) -> tuple[KnnStore, bool]:
    """The run's store, reused when its manifest's identity equals ``identity`` (and not ``force``), else
    rebuilt: keys written to a memory map in a temporary folder, which then replaces ``RUN/knnlm``. Returns
    the store and whether it was reused."""
    final = Path(run_dir) / STORE_DIR
    if final.is_dir() and not force:
        old = _reusable(final, identity)
        if old is not None:
            return old, True
    n, d = len(train_tokens) - 1, model.config.dim
    if n < 1:
        raise ValueError("the train split has fewer than 2 tokens: there is nothing to store for kNN-LM")
    with writing_folder(final) as tmp:
        t0 = time.perf_counter()
        keys = np.memmap(tmp / "keys.f16", dtype=np.float16, mode="w+", shape=(n, d))
        split_hidden_states(model, train_tokens, keys, batch_size, dtype, neighbours, progress)
        keys.flush()
        if not all(np.isfinite(keys[b : b + 65_536]).all() for b in range(0, n, 65_536)):
            raise ValueError("some hidden states overflow fp16; the kNN-LM store cannot hold them")
        del keys
        values = np.asarray(train_tokens[1:], dtype=np.int32)
        np.save(tmp / "values.npy", values)
        manifest = {"identity": identity, "num_keys": n, "dim": d, "key_dtype": "float16",
                    "build_seconds": round(time.perf_counter() - t0, 3), "indexes": {},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return KnnStore.open(final), False
