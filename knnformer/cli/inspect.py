"""``knnformer inspect RUN --chunk N``: one chunk, its neighbours and their scores under the run's current
neighbours and, for a run whose learned retriever refreshed them, under the datastore's initial ones.

Wired into ``knnformer/cli/__init__.py`` by ``add_inspect_parser(sub)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def _listing(neighbours, chunk_id: int, k: int, snippet: int) -> list[dict[str, Any]]:
    from knnformer.data.chunks import provenance

    rows = []
    for nid, score in zip(np.asarray(neighbours.ids[chunk_id][:k]), np.asarray(neighbours.scores[chunk_id][:k])):
        if nid < 0:
            continue
        src = provenance(neighbours.store, neighbours.layout, int(nid))
        rows.append({"chunk_id": int(nid), "split": src.split, "doc_id": src.doc_id, "byte_offset": src.byte_offset,
                     "token_offset": src.token_offset, "score": round(float(score), 4), "text": src.text[:snippet]})
    return rows


def inspect_chunk(run_dir: str | Path, chunk: int, split: str = "train", k: int | None = None,
                  snippet: int = 80) -> dict[str, Any]:
    """Chunk ``chunk`` (counted from the start of ``split``) of a run's datastore and its neighbours: ``current``
    (the run's last refresh, or the datastore's for a frozen retriever) and ``initial`` (the datastore's, when
    the run has refreshed)."""
    from knnformer.data.chunks import provenance
    from knnformer.retrieval.neighbours import load_neighbours
    from knnformer.run.checkpoint import latest_checkpoint, load_checkpoint
    from knnformer.run.record import open_run_datastore, run_neighbours

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    record = load_checkpoint(latest_checkpoint(run_dir))["config"]
    store = open_run_datastore(record)
    current = run_neighbours(record, store, required=False, run_dir=run_dir)
    if current is None:
        raise ValueError(f"the datastore of {run_dir} has no neighbours; build them with `knnformer index "
                         f"{store.path}`")
    lo, hi = current.layout.split_chunks[split]
    if not 0 <= chunk < hi - lo:
        raise ValueError(f"--chunk {chunk} is out of range: {split} has {hi - lo} chunks (0..{hi - lo - 1})")
    chunk_id = lo + chunk
    k = k or current.k
    src = provenance(store, current.layout, chunk_id)
    refresh = record.get("refresh") or {}
    out = {"run": str(run_dir), "split": split, "chunk": chunk, "chunk_id": chunk_id, "doc_id": src.doc_id,
           "byte_offset": src.byte_offset, "text": src.text, "refresh": refresh.get("id", 0),
           "refresh_step": refresh.get("step"), "embedder": current.info["embedder"],
           "current": _listing(current, chunk_id, k, snippet)}
    if refresh.get("id"):
        initial = load_neighbours(store)
        out["initial_embedder"] = initial.info["embedder"]
        out["initial"] = _listing(initial, chunk_id, k, snippet)
    return out


def format_inspection(result: dict[str, Any]) -> str:
    lines = [f"{result['split']} chunk {result['chunk']} (chunk id {result['chunk_id']}) of {result['doc_id']} at "
             f"byte {result['byte_offset']}:", f"  {result['text']!r}", ""]
    sections = [("current", f"neighbours now ({result['embedder']}"
                            + (f", refresh {result['refresh']} at step {result['refresh_step']})" if result["refresh"]
                               else ")"))]
    if "initial" in result:
        sections.append(("initial", f"neighbours before training ({result['initial_embedder']})"))
    for key, title in sections:
        lines.append(title + ":")
        for row in result[key]:
            lines.append(f"  {row['score']:>7.4f}  {row['doc_id']}@{row['byte_offset']}  {row['text']!r}")
        if not result[key]:
            lines.append("  (none)")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    result = inspect_chunk(args.run, args.chunk, args.split, args.k)
    print(json.dumps(result, indent=2) if args.json else format_inspection(result))
    return 0


def add_inspect_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("inspect", help="a chunk and its neighbours with their scores, before and after refreshes")
    s.add_argument("run")
    s.add_argument("--chunk", type=int, required=True, help="chunk number, counted from the start of --split")
    s.add_argument("--split", default="train", choices=["train", "valid", "test"])
    s.add_argument("--k", type=int, default=None, help="neighbours to show (default: all stored)")
    s.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    s.set_defaults(func=cmd_inspect)
    return s
