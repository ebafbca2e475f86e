"""kNN-LM's store of keys: the hidden states of every train position and the train token that followed each.

One store per run, in ``RUN/knnlm/``::

    manifest.json        what built it (``identity``: checkpoint step and sha256 of its weights, datastore corpus
                         sha256 and tokenizer, how the hidden states were computed: windows, dtype, retrieval),
                         ``num_keys`` computed so far of ``total_keys``, width, and the approximate indexes built
    keys.f16             (total_keys, D) fp16 hidden states of the train positions, memory-mapped; the first
                         ``num_keys`` rows are written
    values.npy           (total_keys,) the train token that followed each key
    queries-<split>/     the queries' hidden states and LM log-probabilities (``open_or_build_queries``)

Keys are computed with evaluation's windows (consecutive windows of the context, every train position once), so
a key has the history a scored position has. Windows are written in order and the manifest's ``num_keys`` is
advanced (after the keys are flushed) every ``CHECKPOINT_SECONDS``, so a killed build resumes where it stopped,
and a store asked for its first M keys (``max_keys``) is the prefix of the full one: the model is causal and
the windows start at the same positions, so a 1M-key store grows into a 10M-key store without recomputing a key.
A store is reused while its manifest's identity equals the run's (``store_identity``) and rebuilt from nothing
otherwise.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from knnformer.data.datastore import Datastore
from knnformer.eval.scoring import NeighbourFn, window_batches, window_plan
from knnformer.io import atomic_write_text, file_sha256, writing_folder
from knnformer.model.transformer import Transformer
from knnformer.runtime import autocast

logger = logging.getLogger(__name__)

STORE_DIR = "knnlm"
FORMAT_VERSION = 2
"""2: keys written in order with a resumable count (``num_keys`` of ``total_keys``)."""
CHECKPOINT_SECONDS = 20.0
"""How often a build flushes what it computed and records it, so a kill loses at most this much work."""

Progress = Callable[[int], None]
ProgressFactory = Callable[[int, str], Progress]


COMPILE_MIN_TOKENS = 250_000
"""``compile="auto"`` compiles the forward pass for at least this many positions: ``torch.compile`` costs 4.6-8.5 s
once here and made the small preset's bf16 forward 1.26x faster on this 2-vCPU CPU (23.7k against 18.8k
positions/s at 8 windows a batch, bench/knnlm_forward.py), so below this it would not pay."""


class HiddenStates:
    """``model.hidden_states``, through ``torch.compile`` when asked: the compiled graph is kept for the shape of
    the first batch (full batches of full windows, nearly every call), other shapes and batches with neighbours
    run eagerly, so the split's last, shorter windows never trigger a recompile. A compile that fails (no C++
    compiler, an unsupported op) is logged once and the pass goes on eagerly."""

    def __init__(self, model: Transformer, compile: bool):
        self.model = model
        self.compiled = torch.compile(model.hidden_states, dynamic=False) if compile else None
        self.shape: tuple | None = None

    def __call__(self, x: torch.Tensor, **inputs) -> torch.Tensor:
        if self.compiled is not None and not inputs:
            self.shape = self.shape or tuple(x.shape)
            if tuple(x.shape) == self.shape:
                try:
                    return self.compiled(x)
                except Exception as e:  # any compile failure: the eager pass computes the same model
                    logger.warning("torch.compile of the forward pass failed (%s: %s); continuing eagerly",
                                   type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                    self.compiled = None
        return self.model.hidden_states(x, **inputs)


@torch.no_grad()
def split_hidden_states(model: Transformer, tokens: np.ndarray, out: np.ndarray, batch_size: int = 32,
                        dtype: str = "float32", neighbours: NeighbourFn | None = None,
                        progress: Progress | None = None, logprobs: bool | np.ndarray = False,
                        start: int = 0, stop: int | None = None,
                        checkpoint: Callable[[int], None] | None = None,
                        compile: bool | str = "auto") -> np.ndarray | None:
    """Write into ``out[p - 1]`` (an (N - 1, D) fp32 or fp16 array, e.g. a memory map) the final hidden state
    that predicts token p, for p = 1 .. N - 1, over evaluation's consecutive windows of the context (batched as
    ``score_tokens`` batches them). With ``logprobs``, also return log p_lm(token p) as a float64 (N - 1,)
    array, the very values ``score_tokens`` turns into losses (``logprobs`` may be that array itself, e.g. a
    memory map, to be filled in place).

    ``start`` / ``stop``: only the windows holding rows in ``[start, stop)`` are computed (whole windows, so
    rows up to the end of the last one are written); ``checkpoint(done)`` is called after each batch with the
    row up to which everything is written. ``compile``: run the forward pass through ``torch.compile``
    (``"auto"``: for ``COMPILE_MIN_TOKENS`` positions or more)."""
    context = model.config.context
    model.eval()
    device = next(model.parameters()).device
    num = max(0, len(tokens) - 1)
    stop = num if stop is None else min(stop, num)
    plan = [w for w in window_plan(len(tokens), context, context) if w[0] + w[2] > start and w[0] + w[1] < stop]
    if compile == "auto":
        compile = neighbours is None and sum(w[2] - w[1] for w in plan) >= COMPILE_MIN_TOKENS
    forward = HiddenStates(model, bool(compile))
    out_dtype = torch.float16 if out.dtype == np.float16 else torch.float32  # converted by torch: numpy's is slow
    if isinstance(logprobs, np.ndarray):
        logp = logprobs
    else:
        logp = np.zeros(num, dtype=np.float64) if logprobs else None
    for group, n, x, y, inputs in window_batches(tokens, plan, batch_size, neighbours, device):
        with autocast(dtype, device):
            h = forward(x, **inputs)  # (B, n, D)
            logits = F.linear(h, model.embed.weight) if logp is not None else None  # as Transformer.forward
        if logp is not None:
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
            losses = losses.view(len(group), n).cpu().double().numpy()
        h = h.to(out_dtype).cpu().numpy()
        for row, (begin, first, _) in enumerate(group):
            out[begin + first : begin + n] = h[row, first:]
            if logp is not None:
                logp[begin + first : begin + n] = -losses[row, first:]
        if progress is not None:
            progress(sum(g[2] - g[1] for g in group))
        if checkpoint is not None:
            checkpoint(group[-1][0] + n)
    return logp


@dataclass
class KnnStore:
    """Keys (fp16, memory-mapped) and values of a run's kNN-LM store: its first ``num_keys`` (all that was
    computed, or fewer through ``prefix``)."""

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

    @property
    def complete(self) -> bool:
        """Whether this is the whole store (every train position), not a prefix of it."""
        return self.num_keys == self.manifest.get("total_keys", self.manifest.get("num_keys"))

    def nbytes(self) -> int:
        """Bytes of the keys and values in use (the keys file is sized for the whole store, written in order)."""
        return self.num_keys * (self.dim * 2 + self.values.itemsize)

    def prefix(self, num_keys: int) -> KnnStore:
        """The store of the first ``num_keys`` keys (what a store over that many train positions holds)."""
        num_keys = min(num_keys, self.num_keys)
        return KnnStore(self.path, self.manifest, self.keys[:num_keys], self.values[:num_keys])

    def file_tag(self) -> str:
        """Suffix of the files that depend on which keys are searched (indexes): '' for the whole store."""
        return "" if self.complete else f"-{self.num_keys}"

    @classmethod
    def open(cls, path: str | Path) -> KnnStore:
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            n, d = manifest["num_keys"], manifest["dim"]
            total = manifest.get("total_keys", n)
            keys = np.memmap(path / "keys.f16", dtype=np.float16, mode="r", shape=(total, d))[:n]
            values = np.load(path / "values.npy", mmap_mode="r")[:n]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"the kNN-LM store {path} is incomplete or corrupt ({e}); delete it to rebuild") from None
        if len(values) != n:
            raise ValueError(f"the kNN-LM store {path} holds {len(values)} values for {n} keys; delete it to rebuild")
        return cls(path, manifest, keys, np.asarray(values))


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


def read_manifest(path: Path) -> dict | None:
    """The JSON manifest of a resumable folder, or None when it is missing or unreadable (a kill mid-write)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


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


def _reusable(final: Path, identity: dict, total: int) -> KnnStore | None:
    """The store at ``final`` (complete or not) when its identity is ``identity``; None (and why, logged) when it
    must be rebuilt."""
    try:
        old = KnnStore.open(final)
    except ValueError as e:
        logger.info("rebuilding the kNN-LM store: %s", e)
        return None
    why = _mismatch(old.manifest.get("identity", {}), identity)
    if why is None and old.manifest.get("total_keys", old.num_keys) != total:
        why = "total_keys"
    if why is None:
        return old
    logger.info("rebuilding the kNN-LM store %s: %s changed", final, why)
    return None


def _start_store(final: Path, identity: dict, train_tokens: np.ndarray, dim: int) -> KnnStore:
    """An empty store at ``final`` (whatever was there removed): values written, the keys file sized (sparse)."""
    n = len(train_tokens) - 1
    with writing_folder(final) as tmp:
        with open(tmp / "keys.f16", "wb") as f:
            f.truncate(n * dim * 2)
        np.save(tmp / "values.npy", np.asarray(train_tokens[1:], dtype=np.int32))
        manifest = {"identity": identity, "num_keys": 0, "total_keys": n, "dim": dim, "key_dtype": "float16",
                    "build_seconds": 0.0, "indexes": {},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return KnnStore.open(final)


def open_or_build_store(run_dir: str | Path, model: Transformer, identity: dict, train_tokens: np.ndarray,
                        batch_size: int = 32, dtype: str = "float32", neighbours: NeighbourFn | None = None,
                        progress: Progress | None = None, force: bool = False,
                        max_keys: int | None = None) -> tuple[KnnStore, bool]:
    """The run's store of its first ``max_keys`` train keys (None: all), reused when its manifest's identity
    equals ``identity`` (and not ``force``) and it holds that many keys; resumed (a killed build, or a smaller
    store grown) when it holds fewer; else rebuilt from nothing. Keys are flushed and counted in the manifest
    every ``CHECKPOINT_SECONDS``. Returns the store (that prefix) and whether no key had to be computed.
    ``progress`` is called with the number of keys computed, and first with those already there."""
    final = Path(run_dir) / STORE_DIR
    n, d = len(train_tokens) - 1, model.config.dim
    if n < 1:
        raise ValueError("the train split has fewer than 2 tokens: there is nothing to store for kNN-LM")
    want = n if max_keys is None else max(1, min(int(max_keys), n))
    knn = _reusable(final, identity, n) if final.is_dir() and not force else None
    if knn is not None and knn.num_keys >= want:
        return knn.prefix(want), True
    if knn is None:
        knn = _start_store(final, identity, train_tokens, d)
    manifest = dict(knn.manifest)
    done = manifest["num_keys"]
    if done and progress is not None:
        progress(min(done, want))
    keys = np.memmap(final / "keys.f16", dtype=np.float16, mode="r+", shape=(n, d))
    state = {"done": done, "saved": done, "t": time.perf_counter(), "t0": time.perf_counter()}
    base_seconds = float(manifest.get("build_seconds", 0.0))

    def save(upto: int) -> None:
        lo = state["saved"]
        if not all(np.isfinite(keys[b : min(b + 65_536, upto)]).all() for b in range(lo, upto, 65_536)):
            raise ValueError("some hidden states overflow fp16; the kNN-LM store cannot hold them")
        keys.flush()
        manifest["num_keys"] = upto
        manifest["build_seconds"] = round(base_seconds + time.perf_counter() - state["t0"], 3)
        atomic_write_text(final / "manifest.json", json.dumps(manifest, indent=2))
        state["saved"], state["t"] = upto, time.perf_counter()

    def checkpoint(upto: int) -> None:
        state["done"] = upto
        if time.perf_counter() - state["t"] >= CHECKPOINT_SECONDS:
            save(upto)

    split_hidden_states(model, train_tokens, keys, batch_size, dtype, neighbours, progress, start=done, stop=want,
                        checkpoint=checkpoint)
    save(max(state["done"], done))
    return KnnStore.open(final).prefix(want), False


def open_or_build_queries(knn: KnnStore, model: Transformer, name: str, tokens: np.ndarray, identity: dict,
                          batch_size: int = 32, dtype: str = "float32", neighbours: NeighbourFn | None = None,
                          progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, bool, dict]:
    """The hidden states (n, D) fp32 and LM log-probabilities (n,) float64 of every target of the split ``name``
    (``tokens``), kept memory-mapped in the store's ``queries-<name>/`` and resumed like the keys: reused while
    its identity (the store's, and the sha256 of ``tokens``) matches. Returns them, whether all were reused and
    their identity."""
    folder = knn.path / f"queries-{name}"
    n, d = len(tokens) - 1, model.config.dim
    identity = {**identity, "split": name, "tokens_sha256": _array_sha256(tokens)}
    manifest_path = folder / "manifest.json"
    manifest = read_manifest(manifest_path)
    if manifest is not None and (_mismatch(manifest.get("identity", {}), identity) or manifest.get("n") != n):
        manifest = None
    if manifest is None:
        with writing_folder(folder) as tmp:
            for file, size in (("h.f32", n * d * 4), ("logp.f64", n * 8)):
                with open(tmp / file, "wb") as f:
                    f.truncate(size)
            manifest = {"identity": identity, "n": n, "dim": d, "done": 0}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    done = manifest["done"]
    h = np.memmap(folder / "h.f32", dtype=np.float32, mode="r+", shape=(n, d))
    logp = np.memmap(folder / "logp.f64", dtype=np.float64, mode="r+", shape=(n,))
    if done and progress is not None:
        progress(min(done, n))
    if done < n:
        state = {"t": time.perf_counter()}

        def save(upto: int) -> None:
            h.flush()
            logp.flush()
            manifest["done"] = upto
            atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
            state["t"] = time.perf_counter()

        def checkpoint(upto: int) -> None:
            if time.perf_counter() - state["t"] >= CHECKPOINT_SECONDS:
                save(upto)

        split_hidden_states(model, tokens, h, batch_size, dtype, neighbours, progress, logprobs=logp, start=done,
                            checkpoint=checkpoint)
        save(n)
    return h, logp, done >= n, identity


def _array_sha256(tokens: np.ndarray) -> str:
    import hashlib

    digest = hashlib.sha256()
    for b in range(0, len(tokens), 1 << 22):
        digest.update(np.ascontiguousarray(tokens[b : b + (1 << 22)]).tobytes())
    return digest.hexdigest()
