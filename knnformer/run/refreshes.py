"""A learned run's refreshed neighbours as they lie on disk, ``RUN/refresh/refresh-NNNN/`` (a manifest, the
neighbour arrays and the train vectors they were searched with): reading one back (``load_refresh``), the
history of their recall, live retrieval over the last one (``open_run_retriever``), and pruning the arrays no
checkpoint reads any more.

Computing a refresh is training's work (``train/refresh.py``); reading one is needed by evaluation, generation
and inspection as well, so that half lives here in ``run``, below all of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from knnformer.data.chunks import ChunkLayout
from knnformer.data.datastore import Datastore
from knnformer.retrieval.hops import HOP2_FILE, HOP2_SCORES_FILE
from knnformer.retrieval.neighbours import Neighbours

logger = logging.getLogger(__name__)

REFRESH_DIR = "refresh"
VECTORS_FILE = "embeddings.f16.npy"


def refresh_folder(run_dir: str | Path, refresh_id: int) -> Path:
    return Path(run_dir).resolve() / REFRESH_DIR / f"refresh-{refresh_id:04d}"


def load_refresh(folder: str | Path, store: Datastore, layout: ChunkLayout, hops: int = 1) -> Neighbours:
    """The neighbours a refresh wrote to ``folder`` (memory-mapped; after the second hop for ``hops=2``), refused
    if they do not fit the datastore or the refresh computed fewer hops."""
    folder = Path(folder)
    info = {}
    try:
        info = json.loads((folder / "manifest.json").read_text())
        if hops == 2 and info.get("hops", 1) == 2:
            info = {**info, "file": HOP2_FILE, "scores_file": HOP2_SCORES_FILE}
        ids = np.load(folder / info["file"], mmap_mode="r")
        scores = np.load(folder / info["scores_file"], mmap_mode="r")
        vectors = np.load(folder / VECTORS_FILE, mmap_mode="r")
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"the refreshed neighbours in {folder} are unreadable ({e}); resume from a checkpoint "
                         f"before that refresh, or retrain") from None
    if hops == 2 and info.get("hops", 1) < 2:
        raise ValueError(f"the refresh in {folder} computed one hop only, not the second (retrieval.search.hops=2); "
                         f"evaluate with the run's own config, or retrain with retrieval.search.hops=2")
    if info["tokenizer_fingerprint"] != store.manifest["tokenizer"]["fingerprint"] or \
            ids.shape != (layout.num_chunks, info["k"]) or info["chunk_size"] != layout.chunk_size:
        raise ValueError(f"the refreshed neighbours in {folder} do not fit datastore {store.path}; evaluate the "
                         f"run on the datastore it was trained on")
    return Neighbours(store, layout, ids, scores, info, vectors, folder)


def refresh_history(run_dir: str | Path, upto: int) -> list[dict]:
    """What each refresh 1 .. ``upto`` of a run recorded about its index (read from the refresh manifests):
    its step, index kind and recall@10 against exact search. A refresh whose manifest is gone is skipped."""
    rows = []
    for refresh_id in range(1, upto + 1):
        path = refresh_folder(run_dir, refresh_id) / "manifest.json"
        if not path.is_file():
            continue
        info = json.loads(path.read_text())
        rows.append({"refresh": refresh_id, "step": info["step"], "index_kind": info["index_kind"],
                     "recall_at_10": info["recall_at_10"], "recall_queries": info["recall_queries"]})
    return rows


def prune_refreshes(run_dir: str | Path, keep: set[str]) -> int:
    """Delete the arrays (neighbours, scores, vectors) of every refresh folder of the run not named in ``keep``
    (folders relative to the run, as records name them: those of the kept checkpoints, the current and a pending
    refresh); each ``manifest.json`` stays, so ``refresh_history`` still lists every refresh's recall. Returns
    the bytes freed. A sympy-sized run (135,636 chunks, width 128) writes about 37 MB per refresh."""
    root = Path(run_dir).resolve()
    freed = 0
    for folder in sorted((root / REFRESH_DIR).glob("refresh-*")):
        if str(folder.relative_to(root)) in keep or not folder.is_dir():
            continue
        for f in folder.glob("*.npy"):
            freed += f.stat().st_size
            f.unlink()
    return freed


def changed_share(before: Neighbours, after: Neighbours) -> float:
    """Share of chunks whose neighbour list changed (ids or order)."""
    return float(np.mean(np.any(np.asarray(before.ids) != np.asarray(after.ids), axis=1)))
