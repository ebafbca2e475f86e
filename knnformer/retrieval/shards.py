"""An index too large for one memory, as shards: ``build_shards`` cuts the train vectors into contiguous ranges
and writes one faiss index per range (``shard-000.faiss``, ... and ``shards.json``) through ``index.py``'s
builders; ``ShardedIndex`` memory-maps them and answers a search by searching every shard and merging the
results by score (ids offset back to global chunk ids), which for exact shards is exactly the single index's
answer (tested). ``knnformer index --shards N`` writes the datastore's index this way (``index.shards/``, named
in the manifest with ``shards: N``), and ``live.open_index`` opens it for every reader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from knnformer.io import atomic_write_text
from knnformer.retrieval.index import DenseIndex, SearchResult, build_dense_index

SHARDS_FILE = "shards.json"
SHARDED_INDEX_DIR = "index.shards"
"""The datastore's index written as shards (``knnformer index --shards N``), in place of ``index.faiss``."""


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous [lo, hi) ranges covering 0..n."""
    if shards <= 0:
        raise ValueError(f"the number of index shards must be positive, got {shards}")
    return [(s * n // shards, (s + 1) * n // shards) for s in range(shards)]


def build_shards(xb: np.ndarray, kind: str, shards: int, folder: str | Path, seed: int = 0,
                 progress: Callable[[int], None] | None = None) -> Path:
    """Write ``shards`` ``kind`` indexes over contiguous ranges of the rows of ``xb`` into ``folder``; the list
    (``shards.json``) is written last, so it only names complete shards. Only one shard is in memory at a time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for s, (lo, hi) in enumerate(shard_ranges(len(xb), shards)):
        if hi == lo:
            continue
        name = f"shard-{s:03d}.faiss"
        build_dense_index(xb[lo:hi], kind, seed=seed + s, progress=progress, refine=False).save(folder / name)
        entries.append({"file": name, "lo": lo, "hi": hi})
    atomic_write_text(folder / SHARDS_FILE, json.dumps({"kind": kind, "num_vectors": len(xb), "shards": entries},
                                                        indent=2))
    return folder


class ShardedIndex:
    """The shards of ``build_shards``, searched together: each shard's top k, merged by score."""

    def __init__(self, folder: str | Path, mmap: bool = True):
        folder = Path(folder)
        if not (folder / SHARDS_FILE).is_file():
            raise ValueError(f"no sharded index at {folder} (no {SHARDS_FILE})")
        info = json.loads((folder / SHARDS_FILE).read_text())
        self.folder, self.kind, self.ntotal = folder, info["kind"], int(info["num_vectors"])
        self.shards = [(DenseIndex.load(folder / e["file"], info["kind"], mmap), e["lo"]) for e in info["shards"]]
        if sum(index.ntotal for index, _ in self.shards) != self.ntotal:
            raise ValueError(f"the shards under {folder} hold {sum(i.ntotal for i, _ in self.shards)} vectors, not "
                             f"the {self.ntotal} that {SHARDS_FILE} names; rebuild with `knnformer index --force`")

    @classmethod
    def build(cls, xb: np.ndarray, kind: str, shards: int, folder: str | Path, seed: int = 0,
              progress: Callable[[int], None] | None = None) -> ShardedIndex:
        """``build_shards`` into ``folder``, then open them (memory-mapped)."""
        return cls(build_shards(xb, kind, shards, folder, seed, progress))

    def save(self, path: str | Path) -> None:
        """Move the shard folder to ``path`` (the open shards stay valid: their files keep their inodes)."""
        path = Path(path)
        if path.resolve() != self.folder.resolve():
            os.replace(self.folder, path)
            self.folder = path

    def search(self, xq: np.ndarray, k: int) -> SearchResult:
        """The ``k`` highest-scoring vectors over every shard for each row of ``xq`` (ids global)."""
        scores, ids = [], []
        for index, lo in self.shards:
            found = index.search(xq, k)
            scores.append(found.D)
            ids.append(np.where(found.I >= 0, found.I + lo, -1))
        D, I = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
        D = np.where(I >= 0, D, -np.inf)
        order = np.argsort(-D, axis=1, kind="stable")[:, :k]
        D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
        return SearchResult(np.where(I >= 0, D, 0).astype(np.float32), I)
