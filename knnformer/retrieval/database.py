"""Retrieval databases: datastores a run reads at evaluation, generation or training without having been trained
on them (``--retrieval-db DB``; several are searched as one).

A database is any datastore prepared with the run's tokenizer (``knnformer prepare DOCS --out DB
--tokenizer-from RUN``) and indexed (``knnformer index DB``); its train chunks are what is retrieved.
``open_databases`` refuses one built with another tokenizer or chunk size, a missing, unindexed or half-written
one, and one of zero chunks, each with a one-line error naming the fix.

Leakage (DESIGN.md invariant 2, extended to databases): a database document whose tokens equal those of a valid
or test document of the datastore being scored is never retrieved (``Databases.filter_against``: the documents
are matched by the sha1 of their token ids, so an exact copy under any name is caught, and the count is
reported); a train chunk of the query datastore never retrieves a copy of its own document (for training against
a database that holds the training files). Near-duplicates are not detected.

Searching: each query chunk's text is searched in every database's saved index (with the embedder that built
it), over-fetching and dropping filtered chunks, and the results are merged by score (a neighbour id is global:
database d's train chunk c is ``offsets[d] + c``). ``database_neighbours`` does this for every chunk of some
splits of a query datastore and hands back a ``DatabaseNeighbours``, which the model side reads exactly as it
reads a datastore's own precomputed ``Neighbours``. Memory: each database's index (memory-mapped where faiss
or bm25s allow), and (num_query_chunks, K) ids and scores.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from knnformer.data.chunks import ChunkLayout, chunk_layout, chunk_texts, provenance, read_retrieval_manifest
from knnformer.data.datastore import Datastore
from knnformer.retrieval.index import SearchResult
from knnformer.retrieval.live import Retriever, open_retriever
from knnformer.retrieval.neighbours import NeighbourBatch, Neighbours, neighbour_tokens

logger = logging.getLogger(__name__)

HELD_OUT = ("valid", "test")


def document_hashes(store: Datastore) -> np.ndarray:
    """(num_docs,) the sha1 (hex, 16 characters) of every document's token ids, in ``docs.npy`` order."""
    out = []
    for start, length in zip(store.docs["start"], store.docs["length"]):
        tokens = np.asarray(store.tokens[int(start) : int(start) + int(length)], dtype=np.int64)
        out.append(hashlib.sha1(tokens.tobytes()).hexdigest()[:16])
    return np.asarray(out)


@dataclass
class Database:
    """One database: its datastore, its saved index with the embedder that built it, and which train chunks may
    be retrieved (``banned``) and, for train queries, which query document each chunk copies (``copies``)."""

    retriever: Retriever
    banned: np.ndarray
    """(num_train,) bool: chunks that touch a document copying a held-out document of the scored datastore."""
    copies: np.ndarray
    """(num_train, 2) int64: the query datastore's document copied by the first / last document each chunk's span
    touches (-1: none), so a train query never retrieves a copy of its own document."""
    doc_hashes: np.ndarray
    excluded_docs: np.ndarray | None = None
    """(num_docs,) bool: the documents ``Databases.filter_against`` excluded."""

    @property
    def store(self) -> Datastore:
        return self.retriever.store

    @property
    def layout(self) -> ChunkLayout:
        return self.retriever.layout

    @property
    def num_train(self) -> int:
        return self.layout.num_train

    def span_docs(self) -> tuple[np.ndarray, np.ndarray]:
        """The first and last document (``docs.npy`` rows) each train chunk's span (continuation included) touches."""
        layout, ids = self.layout, np.arange(self.num_train)
        last = np.searchsorted(layout.doc_starts, layout.span_end(ids) - 1, side="right") - 1
        return layout.doc_first[: self.num_train], last


@dataclass
class Databases:
    """Several databases searched as one (``search``), with the leakage filter of the datastore being scored."""

    dbs: list[Database]
    chunk_size: int
    excluded: dict = field(default_factory=dict)
    """What ``filter_against`` removed: documents and chunks, per database and in all."""

    @property
    def offsets(self) -> np.ndarray:
        return np.cumsum([0] + [db.num_train for db in self.dbs])

    @property
    def num_chunks(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokenizer(self):
        return self.dbs[0].store.tokenizer

    def describe(self) -> list[dict]:
        """What identifies each database (path, corpus, index), for a run record or a result."""
        out = []
        for db in self.dbs:
            info = read_retrieval_manifest(db.store.path)["index"]
            out.append({"path": str(db.store.path), "corpus_sha256": db.store.manifest["corpus_sha256"],
                        "embedder": info["embedder"], "index": info["kind"], "chunks": db.num_train})
        return out

    def filter_against(self, query: Datastore) -> dict:
        """Exclude every database document that copies a valid or test document of ``query`` (the datastore to
        be scored or trained on), and note which chunks copy each train document of ``query``. Returns (and
        keeps in ``excluded``) the counts: ``documents`` and ``chunks`` removed."""
        qhash = document_hashes(query)
        split = np.asarray(query.docs["split"])
        held = {h for h, s in zip(qhash, split) if s >= 1}  # SPLITS index: 0 train, 1 valid, 2 test
        train_doc = {h: i for i, (h, s) in enumerate(zip(qhash, split)) if s == 0}
        docs = chunks = 0
        per_db = []
        for db in self.dbs:
            bad_doc = np.array([h in held for h in db.doc_hashes], dtype=bool)
            first, last = db.span_docs()
            cum = np.concatenate([[0], np.cumsum(bad_doc)])
            db.banned = (cum[last + 1] - cum[first]) > 0
            db.excluded_docs = bad_doc
            copy_of = np.array([train_doc.get(h, -1) for h in db.doc_hashes], dtype=np.int64)
            db.copies = np.stack([copy_of[first], copy_of[last]], 1)
            per_db.append({"path": str(db.store.path), "documents": int(bad_doc.sum()), "chunks": int(db.banned.sum()),
                           "copies_of_train_documents": int((copy_of >= 0).sum())})
            docs += int(bad_doc.sum())
            chunks += int(db.banned.sum())
        self.excluded = {"documents": docs, "chunks": chunks, "databases": per_db,
                         "rule": f"database documents equal (token sha1) to a valid or test document of {query.path}"}
        if chunks:
            logger.warning("excluded %d database documents (%d chunks) that copy held-out documents of %s", docs,
                           chunks, query.path)
        return self.excluded

    def search(self, texts: list[str], k: int, query_docs: np.ndarray | None = None) -> SearchResult:
        """The ``k`` nearest allowed chunks of each text over all databases, merged by score, as an index's
        ``SearchResult(D, I)``: scores (n, k) float32 and global chunk ids (n, k), -1 where fewer were allowed. ``query_docs`` (n, 2): the query datastore's documents
        each query chunk touches, for train queries (a copy of them is not retrieved); None for held-out queries."""
        n = len(texts)
        all_i, all_d = [], []
        for d, db in enumerate(self.dbs):
            I, D = self._search_one(db, texts, k, query_docs)
            all_i.append(np.where(I >= 0, I + self.offsets[d], -1))
            all_d.append(np.where(I >= 0, D, -np.inf))
        ids, scores = np.concatenate(all_i, 1), np.concatenate(all_d, 1)
        if ids.shape[1] < k:  # the databases hold fewer than k chunks in all
            pad = k - ids.shape[1]
            ids, scores = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1), \
                np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
        ids = np.where(np.isfinite(scores), ids, -1)
        return SearchResult(np.where(ids >= 0, scores, 0).astype(np.float32), ids.reshape(n, k).astype(np.int64))

    @staticmethod
    def _search_one(db: Database, texts: list[str], k: int, query_docs: np.ndarray | None):
        """Over-fetch from one database's index and drop filtered chunks; short rows are searched again with four
        times the candidates, up to every chunk."""
        n = len(texts)
        out_i = np.full((n, k), -1, dtype=np.int64)
        out_d = np.zeros((n, k), dtype=np.float32)
        rows = np.arange(n)
        kk = min(db.num_train, max(4 * k, k + 16))
        while len(rows):
            D, I = db.retriever.search([texts[r] for r in rows], kk)
            I = np.asarray(I, dtype=np.int64)
            safe = np.maximum(I, 0)
            ok = (I >= 0) & ~db.banned[safe]
            if query_docs is not None:
                qd = query_docs[rows]
                cp = db.copies[safe]  # (r, kk, 2)
                own = ((cp[..., :, None] == qd[:, None, None, :]) & (cp[..., :, None] >= 0)).any((-1, -2))
                ok &= ~own
            order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
            keep = np.take_along_axis(ok, order, 1)
            out_i[rows, : keep.shape[1]] = np.where(keep, np.take_along_axis(I, order, 1), -1)
            out_d[rows, : keep.shape[1]] = np.where(keep, np.take_along_axis(np.asarray(D, np.float32), order, 1), 0)
            short = ok.sum(1) < k
            if kk >= db.num_train:
                break
            rows, kk = rows[short], min(db.num_train, kk * 4)
        return out_i, out_d

    def neighbours(self, texts: list[str], k: int, pad_id: int = 0) -> NeighbourBatch:
        """Live retrieval for new text (generation), as ``live.Retriever.neighbours``: (len(texts), k, 2C)."""
        scores, ids = self.search(texts, k)
        tokens, mask = self.tokens(ids, pad_id)
        return NeighbourBatch(tokens, mask, ids, scores)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(database index, local train chunk id) of global ids (any shape; -1 gives database -1)."""
        ids = np.asarray(ids, dtype=np.int64)
        d = np.searchsorted(self.offsets, ids, side="right") - 1
        d = np.where(ids >= 0, d, -1)
        return d, np.where(ids >= 0, ids - self.offsets[np.maximum(d, 0)], -1)

    def tokens(self, ids: np.ndarray, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (*S, 2C) of the global chunk ids (any shape) with their continuation, padded, and the mask."""
        ids = np.asarray(ids, dtype=np.int64)
        d, local = self.locate(ids)
        tokens = np.full((*ids.shape, 2 * self.chunk_size), pad_id, dtype=np.int64)
        mask = np.zeros(tokens.shape, dtype=bool)
        for j, db in enumerate(self.dbs):
            sel = d == j
            if sel.any():
                t, m = neighbour_tokens(db.store, db.layout, np.where(sel, local, -1), pad_id)
                tokens[sel], mask[sel] = t[sel], m[sel]
        return tokens, mask

    def source(self, chunk_id: int) -> dict:
        """Provenance of one global chunk id: database, document, offsets and text."""
        d, local = self.locate(np.asarray([chunk_id]))
        db = self.dbs[int(d[0])]
        return {"database": str(db.store.path), **provenance(db.store, db.layout, int(local[0])).to_dict()}


def open_databases(paths: list[str | Path], tokenizer_fingerprint: str, chunk_size: int | None = None,
                   what: str = "the run") -> Databases:
    """Open and check the databases at ``paths``: each a datastore with the tokenizer ``tokenizer_fingerprint``
    (``what``'s), indexed with chunks of ``chunk_size`` (None: any, but all the same), holding train chunks."""
    if not paths:
        raise ValueError("--retrieval-db needs at least one database")
    dbs, sizes = [], set()
    for path in paths:
        path = Path(path)
        if not (path / "manifest.json").is_file():
            raise ValueError(f"retrieval database {path} is not a datastore (no manifest.json); build it with "
                             f"`knnformer prepare DOCS --out {path} --tokenizer-from RUN`, then `knnformer index {path}`")
        store = Datastore.open(path)
        if store.manifest["tokenizer"]["fingerprint"] != tokenizer_fingerprint:
            raise ValueError(f"retrieval database {path} was prepared with another tokenizer than {what}'s; "
                             f"re-prepare it with `knnformer prepare DOCS --out {path} --tokenizer-from RUN --force`")
        info = read_retrieval_manifest(path).get("index")
        if info is None:
            raise ValueError(f"retrieval database {path} has no index (or its indexing did not finish); build it "
                             f"with `knnformer index {path}`")
        if info.get("tokenizer_fingerprint") != tokenizer_fingerprint:
            raise ValueError(f"the index of retrieval database {path} was built for another tokenizer; rebuild it "
                             f"with `knnformer index {path} --force`")
        if chunk_size is not None and info["chunk_size"] != chunk_size:
            raise ValueError(f"retrieval database {path} is indexed with chunks of {info['chunk_size']} tokens, "
                             f"{what} reads chunks of {chunk_size}; rebuild with `knnformer index {path} "
                             f"--chunk-size {chunk_size} --force`")
        layout = chunk_layout(store, info["chunk_size"])
        if layout.num_train == 0 or info.get("num_vectors") != layout.num_train:
            raise ValueError(f"retrieval database {path} has {layout.num_train} train chunks but its index holds "
                             f"{info.get('num_vectors')}; " + ("prepare it with documents in train "
                             "(`--valid-fraction 0 --test-fraction 0`)" if layout.num_train == 0
                             else f"rebuild with `knnformer index {path} --force`"))
        try:
            retriever = open_retriever(store)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"the index of retrieval database {path} is unreadable ({e}); rebuild it with "
                             f"`knnformer index {path} --force`") from None
        sizes.add(info["chunk_size"])
        n = layout.num_train
        hashes = document_hashes(store)
        dbs.append(Database(retriever, np.zeros(n, bool), np.full((n, 2), -1, np.int64), hashes,
                            np.zeros(len(hashes), bool)))
    if len(sizes) > 1:
        raise ValueError(f"the retrieval databases are indexed with different chunk sizes {sorted(sizes)}; index "
                         f"them all with one `--chunk-size`")
    return Databases(dbs, sizes.pop())


@dataclass
class DatabaseNeighbours(Neighbours):
    """Every chunk of some splits of a query datastore with its neighbours from ``databases`` (global ids): read
    by the model exactly like a datastore's own ``Neighbours`` (``for_chunks``, ``for_windows``)."""

    databases: Databases | None = None

    def for_chunks(self, chunk_ids, k: int | None = None, pad_id: int = 0) -> NeighbourBatch:
        k = self.k if k is None else k
        if k > self.k:
            raise ValueError(f"{k} neighbours asked for, but only {self.k} were retrieved from the databases")
        q = np.asarray(chunk_ids, dtype=np.int64)
        nid = np.where(q[..., None] >= 0, self.ids[np.maximum(q, 0)][..., :k], -1).astype(np.int64)
        score = np.where(nid >= 0, self.scores[np.maximum(q, 0)][..., :k], 0).astype(np.float32)
        tokens, mask = self.databases.tokens(nid, pad_id)
        return NeighbourBatch(tokens, mask, nid, score)

    def with_past(self, *args, **kwargs) -> NeighbourBatch:
        raise ValueError("retrieval.search.sources=past searches the scored document's own chunks, which a "
                         "retrieval database does not hold; evaluate without --retrieval-db")


def database_neighbours(databases: Databases, query: Datastore, splits: tuple[str, ...], k: int,
                        batch_size: int = 1024, progress: Callable[[int], None] | None = None) -> DatabaseNeighbours:
    """The ``k`` nearest allowed database chunks of every chunk of ``splits`` of ``query`` (other rows -1), after
    ``databases.filter_against(query)``; train queries never retrieve a copy of their own document."""
    if not databases.excluded:
        databases.filter_against(query)
    layout = chunk_layout(query, databases.chunk_size)
    ids = np.full((layout.num_chunks, k), -1, dtype=np.int64)
    scores = np.zeros((layout.num_chunks, k), dtype=np.float32)
    for split in splits:
        lo, hi = layout.split_chunks[split]
        for b in range(lo, hi, batch_size):
            q = np.arange(b, min(hi, b + batch_size))
            docs = np.stack([layout.doc_first[q], layout.doc_last[q]], 1) if split == "train" else None
            scores[q], ids[q] = databases.search(chunk_texts(query, layout, q), k, docs)
            if progress is not None:
                progress(len(q))
    embedders = sorted({read_retrieval_manifest(db.store.path)["index"]["embedder"] for db in databases.dbs})
    info = {"embedder": "+".join(embedders), "embedder_fingerprint": "database", "k": k,
            "chunk_size": databases.chunk_size, "databases": databases.describe(), "excluded": databases.excluded,
            "splits": list(splits), "file": None}
    return DatabaseNeighbours(query, layout, ids, scores, info, databases=databases)
