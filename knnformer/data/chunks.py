"""Chunks: the unit of retrieval. Each split's token range is cut into chunks of C tokens.

The chunk grid restarts at the start of every split, so no chunk ever holds tokens of two splits (a train chunk
that ran into valid would put valid text in the index). Train documents come first in ``tokens.bin``, so train
starts at token 0 and **train chunk i is exactly tokens[i*C : (i+1)*C]**; valid and test chunk j of a split is
``tokens[lo + j*C : lo + (j+1)*C]`` with ``lo`` the split's start. Chunk ids are global: train chunks are
``0 .. num_train-1``, then valid's, then test's. A split's last chunk may be shorter than C.

A chunk may straddle a document boundary. Its document is the document of its first token; the documents it
touches are the contiguous range ``doc_first .. doc_last`` of ``docs.npy`` rows.

Continuation (RETRO): the continuation of train chunk n is chunk n + 1 when that is a train chunk and starts in
the middle of a document (the text goes on); it is -1 when chunk n + 1 is past the end of train or begins a new
document (what follows would be unrelated text).

Nothing here loads the token array whole: chunk ranges are computed from the split ranges, tokens are read from
the memory map on demand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knnformer.data.corpus import SPLITS
from knnformer.data.datastore import Datastore
from knnformer.io import atomic_write_text

DEFAULT_CHUNK_SIZE = 16
"""Small enough that nanoGPT's 64-token context holds four chunks, so retrieval serves most of a window (the
model's ``retrieval.chunk_size`` defaults to the index's)."""


@dataclass(frozen=True)
class ChunkLayout:
    """Where every chunk of a datastore lies. Arrays have one entry per chunk, in chunk-id order."""

    chunk_size: int
    split_chunks: dict[str, tuple[int, int]]
    """Each split's chunk ids as a half-open range; train is always ``(0, num_train)``."""
    starts: np.ndarray
    """(num_chunks,) int64 first token position of each chunk in ``tokens.bin``."""
    ends: np.ndarray
    """(num_chunks,) int64 one past the last token (``starts + C``, or less for a split's last chunk)."""
    doc_first: np.ndarray
    """(num_chunks,) int64 ``docs.npy`` row of each chunk's first token (the chunk's document)."""
    doc_last: np.ndarray
    """(num_chunks,) int64 ``docs.npy`` row of each chunk's last token."""
    doc_starts: np.ndarray
    """(num_docs,) int64 first token of every document, ascending."""

    @property
    def num_chunks(self) -> int:
        return len(self.starts)

    @property
    def num_train(self) -> int:
        return self.split_chunks["train"][1]

    def split_of(self, chunk_id: int) -> str:
        for name, (lo, hi) in self.split_chunks.items():
            if lo <= chunk_id < hi:
                return name
        raise ValueError(f"chunk {chunk_id} is out of range (the datastore has {self.num_chunks} chunks)")

    def chunk_of(self, position: int | np.ndarray) -> int | np.ndarray:
        """The chunk holding token ``position`` (scalar or array) of ``tokens.bin``."""
        pos = np.asarray(position, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= (self.ends[-1] if self.num_chunks else 0)):
            raise ValueError(f"token position out of range: the datastore has {int(self.ends[-1])} tokens")
        ids = np.searchsorted(self.starts, pos, side="right") - 1
        return int(ids) if ids.ndim == 0 else ids

    def continuations(self, ids: np.ndarray) -> np.ndarray:
        """Each train chunk's continuation (the next chunk id), or -1 at the end of train or of a document."""
        ids = np.asarray(ids, dtype=np.int64)
        nxt = ids + 1
        ok = (ids >= 0) & (nxt < self.num_train)
        safe = np.where(ok, nxt, 0)
        if self.num_chunks:
            # chunk n+1 continues the text when its first token is not the first token of a document
            begins_doc = self.doc_starts[self.doc_first[safe]] == self.starts[safe]
            ok &= ~begins_doc
        return np.where(ok, nxt, -1)

    def span_end(self, ids: np.ndarray) -> np.ndarray:
        """One past the last token a retrieved neighbour hands over: its continuation's end, else its own end."""
        cont = self.continuations(ids)
        return np.where(cont >= 0, self.ends[np.maximum(cont, 0)], self.ends[ids])

    def describe(self) -> dict:
        return {"chunk_size": self.chunk_size, "num_chunks": self.num_chunks,
                "split_chunks": {k: list(v) for k, v in self.split_chunks.items()}}


def chunk_layout(store: Datastore, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkLayout:
    """Cut each split of ``store`` into chunks of ``chunk_size`` tokens (see the module docstring)."""
    if chunk_size <= 0:
        raise ValueError(f"--chunk-size must be positive, got {chunk_size}")
    starts, ends, split_chunks, count = [], [], {}, 0
    for name in SPLITS:
        lo, hi = store.split_range(name)
        n = -(-(hi - lo) // chunk_size)
        s = lo + np.arange(n, dtype=np.int64) * chunk_size
        starts.append(s)
        ends.append(np.minimum(s + chunk_size, hi))
        split_chunks[name] = (count, count + n)
        count += n
    starts_a, ends_a = np.concatenate(starts), np.concatenate(ends)
    doc_starts = np.asarray(store.docs["start"], dtype=np.int64)
    assert np.all(np.diff(doc_starts) >= 0), "docs.npy rows are in token order"
    doc_first = np.searchsorted(doc_starts, starts_a, side="right") - 1
    doc_last = np.searchsorted(doc_starts, ends_a - 1, side="right") - 1
    return ChunkLayout(chunk_size, split_chunks, starts_a, ends_a, doc_first, doc_last, doc_starts)


def chunk_tokens(store: Datastore, layout: ChunkLayout, ids) -> list[np.ndarray]:
    """The token ids of each chunk (copies, read from the memory map)."""
    return [np.asarray(store.tokens[layout.starts[i] : layout.ends[i]]) for i in np.asarray(ids, dtype=np.int64)]


def chunk_texts(store: Datastore, layout: ChunkLayout, ids) -> list[str]:
    """Each chunk decoded to text (invalid UTF-8 at a cut byte becomes U+FFFD)."""
    return [store.tokenizer.decode(t) for t in chunk_tokens(store, layout, ids)]


@dataclass
class ChunkSource:
    """Where a chunk's text comes from, for provenance."""

    chunk_id: int
    split: str
    doc_id: str
    """The document of the chunk's first token (file path or record id)."""
    token_offset: int
    """Token position of the chunk's start within that document."""
    byte_offset: int
    """UTF-8 byte offset of the chunk's start within that document's text."""
    text: str
    """The chunk decoded; it runs into the next document when ``straddles`` is true."""
    straddles: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def provenance(store: Datastore, layout: ChunkLayout, chunk_id: int) -> ChunkSource:
    """Document, offsets and text of one chunk: ``text`` begins at ``byte_offset`` of document ``doc_id``."""
    chunk_id = int(chunk_id)
    split = layout.split_of(chunk_id)
    start = int(layout.starts[chunk_id])
    doc = int(layout.doc_first[chunk_id])
    doc_start = int(layout.doc_starts[doc])
    byte_offset = store.bytes_before(start) - store.bytes_before(doc_start)
    text = chunk_texts(store, layout, [chunk_id])[0]
    return ChunkSource(chunk_id, split, store.doc_ids[doc], start - doc_start, byte_offset, text,
                       bool(layout.doc_last[chunk_id] != doc))


def read_retrieval_manifest(store_path: str | Path) -> dict:
    """The ``retrieval`` section of a datastore's manifest (empty when ``knnformer index`` never ran)."""
    manifest = json.loads((Path(store_path) / "manifest.json").read_text())
    return manifest.get("retrieval", {})


def update_retrieval_manifest(store_path: str | Path, updates: dict | None = None, drop: tuple[str, ...] = ()) -> dict:
    """Set keys of the manifest's ``retrieval`` section (and remove ``drop``), writing the manifest atomically."""
    path = Path(store_path) / "manifest.json"
    manifest = json.loads(path.read_text())
    section = manifest.setdefault("retrieval", {})
    for key in drop:
        section.pop(key, None)
    section.update(updates or {})
    atomic_write_text(path, json.dumps(manifest, indent=2))
    return section
