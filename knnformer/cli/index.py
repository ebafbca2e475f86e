"""``knnformer index DATASTORE``: chunk, embed, index and precompute neighbours, then print a summary.

Wired into ``knnformer/cli/__init__.py`` by ``add_index_parser(sub)``; it shares the top-level ``--quiet`` flag.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from knnformer.cli.common import say
from knnformer.data.chunks import DEFAULT_CHUNK_SIZE
from knnformer.retrieval.index import DEFAULT_MEMORY_BUDGET, INDEX_KINDS
from knnformer.retrieval.neighbours import DEFAULT_EMBEDDER, DEFAULT_EXCLUDE_WINDOW, DEFAULT_K


class _Bars:
    """One tqdm bar per stage; the previous stage's bar closes when the next opens."""

    def __init__(self, disable: bool):
        self.disable, self.bar = disable, None

    def __call__(self, stage: str, total: int):
        self.close()
        self.bar = tqdm(total=total, unit="chunk", unit_scale=True, desc=stage, disable=self.disable,
                        dynamic_ncols=True)
        return self.bar.update

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_summary(path: str, section: dict, seconds: float) -> str:
    chunks, index, nb = section["chunks"], section["index"], section.get("neighbours")
    split = ", ".join(f"{name} {hi - lo:,}" for name, (lo, hi) in chunks["split_chunks"].items())
    rules = "" if nb is None else (f"window +-{nb['exclude_window']} tokens"
                                   + (", own documents" if nb["exclude_same_document"] else ""))
    emb = section.get("embeddings", {})
    rows = [
        ("datastore", path),
        ("chunks", f"{chunks['num_chunks']:,} of {chunks['chunk_size']} tokens ({split})"),
        ("embedder", index["embedder"] + (f" (dim {index['dim']})" if index["dim"] else " (sparse)")
         + (f", embedded in {emb['seconds']:.1f}s" if emb.get("fingerprint") == index["embedder_fingerprint"] else "")),
        ("index", (f"{index['kind']}, {index['num_vectors']:,} train chunks, "
                   f"{index['bytes_per_chunk']:,.0f} bytes/chunk, built in {index['build_seconds']:.1f}s")),
        ("recall@10", f"{index['recall_at_10']:.4f}" + (f" vs exact on {index['recall_queries']:,} queries"
                                                         if index["recall_queries"] else " (exact search)")),
        ("neighbours", "not computed (--no-neighbours: a retrieval database)" if nb is None else
                       f"k={nb['k']} per chunk in {nb['seconds']:.1f}s; excluded: {rules}"
                       + (f"; {nb['num_short_rows']:,} chunks short of k" if nb["num_short_rows"] else "")),
        *([("second hop", f"in {section['neighbours_hop2']['seconds']:.1f}s; "
                          f"{section['neighbours_hop2']['merge']}")] if "neighbours_hop2" in section else []),
        ("total", f"{seconds:.1f}s"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def cmd_index(args) -> int:
    from knnformer.data.datastore import Datastore
    from knnformer.io import claim_folder, recover_swapped_folder
    from knnformer.retrieval.build import index_datastore
    from knnformer.runtime import resolve_device
    from knnformer.train import parallel

    nproc = getattr(args, "nproc", 0)
    if nproc > 1 and parallel.launched().size == 1:  # start torchrun with this command, minus --nproc
        import sys

        from knnformer.cli.train import strip_nproc

        return parallel.launch(nproc, strip_nproc(args.argv or sys.argv[1:]), args.device or "auto")
    world = parallel.launched()
    if world.main:  # under torchrun rank 0 holds the folder for all ranks (they only add their shard files)
        recover_swapped_folder(args.datastore)  # a prepare --force killed mid-swap left the old datastore aside
    Datastore.open(args.datastore)  # a one-line error for what is not a datastore, before any lock file is made
    _claim = claim_folder(args.datastore, "index") if world.main else None  # one writer per folder
    t0 = time.perf_counter()
    device = str(resolve_device(args.device or "cpu"))
    if parallel.launched().size > 1 and not embed_over_ranks(args):  # under torchrun: only rank 0 indexes
        return 0
    bars = _Bars(getattr(args, "quiet", False))
    try:
        section = index_datastore(args.datastore, embedder=args.embedder, index=args.index, k=args.k,
                                  chunk_size=args.chunk_size, exclude_window=args.exclude_window,
                                  memory_budget=int(args.memory_budget * (1 << 30)),
                                  force=args.force and parallel.launched().size == 1,  # the ranks just embedded
                                  progress=bars, hops=args.hops, device=device,
                                  neighbours=not args.no_neighbours, shards=args.shards)
    finally:
        bars.close()
    print(f"indexed {args.datastore}")
    print(format_summary(args.datastore, section, time.perf_counter() - t0))
    return 0


def embed_over_ranks(args) -> bool:
    """Under torchrun: every rank embeds its share of the chunks, rank 0 joins them (``parallel.embed_sharded``).
    Returns True on rank 0, which goes on to build the index and neighbours from the joined embeddings."""
    from knnformer.retrieval.embedders import make_embedder
    from knnformer.train import parallel

    world, device = parallel.start(args.device or "cpu")
    try:
        emb = make_embedder(args.embedder, str(device))
        if emb.sparse:
            if world.main:
                say(f"{args.embedder} is a sparse index with nothing to embed: one process builds it")
        else:
            bars = _Bars(getattr(args, "quiet", False) or not world.main)
            try:
                parallel.embed_sharded(args.datastore, emb, args.chunk_size, world, force=args.force,
                                       progress=bars("embedding (this rank's share)", None))
            finally:
                bars.close()
    finally:
        parallel.stop()
    return world.main


def add_index_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("index", help="embed a datastore's chunks, index the train chunks and precompute neighbours")
    s.add_argument("datastore")
    s.add_argument("--embedder", default=DEFAULT_EMBEDDER, metavar="minilm|minilm-fp32|bm25|bytes-hash|run:RUN",
                   help=f"what embeds each chunk (default: {DEFAULT_EMBEDDER})")
    s.add_argument("--index", default="auto", choices=INDEX_KINDS,
                   help="faiss index: exact flat, hnsw or ivfpq; auto picks by size and --memory-budget")
    s.add_argument("--k", type=int, default=DEFAULT_K, help=f"neighbours stored per chunk (default {DEFAULT_K})")
    s.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help=f"tokens per chunk (default {DEFAULT_CHUNK_SIZE})")
    s.add_argument("--exclude-window", type=int, default=DEFAULT_EXCLUDE_WINDOW,
                   help="a train chunk gets no neighbour within this many tokens of it; at least the model's "
                        f"context plus one chunk (default {DEFAULT_EXCLUDE_WINDOW})")
    s.add_argument("--memory-budget", type=float, default=DEFAULT_MEMORY_BUDGET / (1 << 30),
                   help="GiB the index may take; auto picks a smaller index kind above it (default 2)")
    s.add_argument("--shards", type=int, default=1, metavar="N",
                   help="write the index as N faiss files over contiguous ranges of the train chunks, searched "
                        "with a merge by score (one shard in memory while building; default 1: one index.faiss)")
    s.add_argument("--hops", type=int, default=1, choices=[1, 2],
                   help="2: also the second hop's neighbours, searched with each chunk joined with its first "
                        "neighbour (for retrieval.search.hops=2; see knnformer/hops.py)")
    s.add_argument("--no-neighbours", action="store_true",
                   help="build the index alone, for a retrieval database (--retrieval-db searches it live); "
                        "training on this datastore needs its neighbours")
    s.add_argument("--force", action="store_true", help="recompute the embeddings even if the manifest says they match")
    s.add_argument("--device", default=None, help="where a model embedder runs: auto, cpu, cuda, cuda:N, mps "
                   "(default cpu; faiss stays on the CPU)")
    s.add_argument("--nproc", type=int, default=0, metavar="N",
                   help="embed the chunks with N processes (torchrun), then index them in one")
    s.set_defaults(argv=None)
    s.set_defaults(func=cmd_index)
    return s
