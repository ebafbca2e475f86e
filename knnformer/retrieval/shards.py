"""An index too large for one memory, as shards: ``build_shards`` cuts the train vectors into contiguous ranges
and writes one faiss index per range (``shard-000.faiss``, ... and ``shards.json``) through ``index.py``'s
builders; ``ShardedIndex`` memory-maps them and answers a search by searching every shard and merging the
results by score (ids offset back to global chunk ids), which for exact shards is exactly the single index's
answer (tested). A shard can be built by its own process (``knnformer index --nproc`` embeds in shares; building
the shards there is the next step, not wired yet).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from knnformer.io import atomic_write_text
from knnformer.retrieval.index import DenseIndex, SearchResult, build_dense_index

SHARDS_FILE = "shards.json"


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous [lo, hi) ranges covering 0..n."""
    if shards <= 0:
        raise ValueError(f"the number of index shards must be positive, got {shards}")
    return [(s * n // shards, (s + 1) * n // shards) for s in range(shards)]


def build_shards(xb: np.ndarray, kind: str, shards: int, folder: str | Path, seed: int = 0) -> Path:
    """Write ``shards`` ``kind`` indexes over contiguous ranges of the rows of ``xb`` into ``folder``; the list
    (``shards.json``) is written last, so it only names complete shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for s, (lo, hi) in enumerate(shard_ranges(len(xb), shards)):
        if hi == lo:
            continue
        name = f"shard-{s:03d}.faiss"
        build_dense_index(xb[lo:hi], kind, seed=seed + s, refine=False).save(folder / name)
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
        self.kind, self.ntotal = info["kind"], int(info["num_vectors"])
        self.shards = [(DenseIndex.load(folder / e["file"], info["kind"], mmap), e["lo"]) for e in info["shards"]]

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
