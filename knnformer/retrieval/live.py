"""Live retrieval, for text the datastore does not hold (generation): ``open_retriever`` opens a datastore's saved
index (memory-mapped) with the embedder that built it, and ``Retriever`` embeds new text, searches the index
(a second hop too for runs trained with ``retrieval.hops=2``) and hands back the neighbours' tokens in the same
``NeighbourBatch`` the precomputed neighbours give.

Training and evaluation never search: they read precomputed neighbours (``neighbours.py``). Searching at
generation time is the one exception, and it lives here so that the precomputed path stays free of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knnformer.data.chunks import ChunkLayout, chunk_layout, chunk_texts, read_retrieval_manifest
from knnformer.data.datastore import Datastore
from knnformer.retrieval.embedders import make_embedder
from knnformer.retrieval.hops import merge_hops
from knnformer.retrieval.index import BM25Index, DenseIndex, SearchResult
from knnformer.retrieval.neighbours import NeighbourBatch, neighbour_tokens
from knnformer.retrieval.shards import ShardedIndex

logger = logging.getLogger(__name__)


def open_index(store: Datastore) -> DenseIndex | BM25Index | ShardedIndex:
    """The saved index of a datastore (memory-mapped), for live retrieval at generation time."""
    info = read_retrieval_manifest(store.path).get("index")
    if info is None:
        raise ValueError(f"{store.path} has no index; build it with `knnformer index {store.path}`")
    if info["kind"] == "bm25":
        return BM25Index.load(store.path / info["file"])
    if info.get("shards", 1) > 1:  # written as per-range files (`knnformer index --shards N`), merged by score
        index = ShardedIndex(store.path / info["file"])
    else:
        index = DenseIndex.load(store.path / info["file"], info["kind"])
    if index.ntotal != info["num_vectors"]:  # an index of another datastore, or of another build
        raise ValueError(f"{store.path / info['file']} holds {index.ntotal} vectors, not the "
                         f"{info['num_vectors']} train chunks the manifest names; rebuild with "
                         f"`knnformer index {store.path} --force`")
    return index


@dataclass
class Retriever:
    """Live retrieval for text the datastore does not hold (generation): embed, search, gather tokens."""

    store: Datastore
    layout: ChunkLayout
    index: DenseIndex | BM25Index | ShardedIndex
    embedder: object
    hops: int = 1
    """1, or 2 for a run trained with ``retrieval.search.hops=2`` (see ``neighbours``)."""

    @property
    def chunk_size(self) -> int:
        return self.layout.chunk_size

    @property
    def tokenizer(self):
        return self.store.tokenizer

    def source(self, chunk_id: int) -> dict:
        """Provenance of one train chunk: document, offsets and text."""
        from knnformer.data.chunks import provenance

        return provenance(self.store, self.layout, int(chunk_id)).to_dict()

    def search(self, texts: list[str], k: int) -> SearchResult:
        """The ``k`` nearest train chunks of each text."""
        return self.index.search(texts if self.embedder.sparse else self.embedder.embed(texts), k)

    def neighbours(self, texts: list[str], k: int, pad_id: int = 0) -> NeighbourBatch:
        """Like ``Neighbours.for_chunks`` for chunks of new text: (len(texts), k, 2C) tokens and mask. With
        ``hops`` = 2, as the run was trained: the first hop's top neighbour, then the second hop's results (its
        query: the text joined with that neighbour's text), as ``hops.merge_hops`` orders them."""
        D, I = self.search(texts, k)
        if self.hops == 2:
            first = chunk_texts(self.store, self.layout, np.maximum(I[:, 0], 0))
            D2, I2 = self.search([t + f if i >= 0 else t for t, f, i in zip(texts, first, I[:, 0])], k)
            I, D = merge_hops(I, D, I2, D2, k)
            I, D = I.astype(np.int64), D.astype(np.float32)
        tokens, mask = neighbour_tokens(self.store, self.layout, I, pad_id)
        return NeighbourBatch(tokens, mask, I, np.where(I >= 0, D, 0).astype(np.float32))


def open_retriever(datastore: str | Path | Datastore) -> Retriever:
    """The datastore's index with the embedder that built it (refused if that embedder has changed since)."""
    store = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore)
    info = read_retrieval_manifest(store.path).get("index")
    if info is None:
        raise ValueError(f"{store.path} has no index; build it with `knnformer index {store.path}`")
    embedder = make_embedder(info["embedder"])
    if embedder.fingerprint() != info["embedder_fingerprint"]:
        raise ValueError(f"the index of {store.path} was built by another version of embedder {info['embedder']!r}; "
                         f"rebuild with `knnformer index {store.path} --embedder {info['embedder']} --force`")
    return Retriever(store, chunk_layout(store, info["chunk_size"]), open_index(store), embedder)
