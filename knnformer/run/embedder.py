"""``run:RUN``: a trained run's decoder as a frozen embedder of chunk text (see ``retrieval/embedders.py``).

Retrieval cannot import runs, so this module hands the opener to ``retrieval.embedders.register_embedder``
when ``knnformer.run`` is imported."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from knnformer.retrieval.embedders import _normalize, register_embedder

logger = logging.getLogger(__name__)


class RunEmbedder:
    """A trained run's decoder as a frozen embedder (see the module docstring). Build it with ``open``."""

    def __init__(self, name: str, model, tokenizer, weights_sha256: str, device: str = "cpu", batch_size: int = 256):
        self.name, self.dim, self.sparse = name, model.config.dim, False
        self.model, self.tokenizer, self.weights_sha256 = model, tokenizer, weights_sha256
        self.device, self.batch_size = device, batch_size

    @classmethod
    def open(cls, run_dir: str | Path, device: str = "cpu") -> "RunEmbedder":
        from knnformer.io import file_sha256
        from knnformer.run.record import load_run, open_run_datastore

        run_dir = Path(run_dir).resolve()
        if not run_dir.is_dir():
            raise ValueError(f"--embedder run:{run_dir}: no such run folder; train one with `knnformer train`")
        model, record, ckpt = load_run(run_dir, device)
        tokenizer = open_run_datastore(record).tokenizer
        return cls(f"run:{run_dir}", model, tokenizer, file_sha256(Path(ckpt) / "model.safetensors"), device)

    def fingerprint(self) -> str:
        return f"run:{self.weights_sha256[:16]}:mean-final-hidden"

    def embed(self, texts: Sequence[str]) -> np.ndarray:

        context = self.model.config.context
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        ids = [self.tokenizer.encode(t)[:context] for t in texts]
        order = np.argsort([len(x) for x in ids], kind="stable")
        for b in range(0, len(order), self.batch_size):
            idx = [i for i in order[b : b + self.batch_size] if ids[i]]  # empty text keeps its zero row
            if not idx:
                continue
            T = max(len(ids[i]) for i in idx)
            x = torch.zeros(len(idx), T, dtype=torch.long)
            mask = torch.zeros(len(idx), T, 1)
            for row, i in enumerate(idx):
                x[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            with torch.inference_mode():
                # causal: padding at the end changes no real position's state
                h = self.model.hidden_states(x.to(self.device)).float().cpu()
            out[idx] = ((h * mask).sum(1) / mask.sum(1)).numpy()
        return _normalize(out)


register_embedder("run", RunEmbedder.open)
