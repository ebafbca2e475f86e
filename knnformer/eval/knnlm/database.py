"""kNN-LM over retrieval databases (``--retrieval-db DB --mode knn-lm``): the keys are the run's hidden states of
the databases' text instead of its train split's, so any run reads new text with no training (Khandelwal et al.
swap a Wikipedia model's datastore for books' this way).

The keys are every position of the databases' documents that survive the leakage filter (``Databases.
filter_against``: no copy of a held-out document of the scored datastore), concatenated database by database, in
a store of their own under ``RUN/knnlm-db/<key>/``, where ``<key>`` names the databases and the filter; the search,
tuning and scoring are kNN-LM's own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from knnformer.data.datastore import Datastore
from knnformer.eval.knnlm.store import store_identity
from knnformer.retrieval.database import Databases, database_neighbours, open_databases

STORE_PARENT = "knnlm-db"


def database_tokens(dbs: Databases) -> np.ndarray:
    """The tokens of every database document that survived the filter, in order (a copy in memory)."""
    parts = []
    for db in dbs.dbs:
        lo, hi = db.store.split_range("train")
        rows = db.store.docs
        keep = (np.asarray(rows["split"]) == 0) & ~db.excluded_docs
        starts, lengths = np.asarray(rows["start"])[keep], np.asarray(rows["length"])[keep]
        if keep.all() or not len(starts):
            parts.append(np.asarray(db.store.tokens[lo:hi]) if keep.all() else np.zeros(0, db.store.tokens.dtype))
            continue
        parts.extend(np.asarray(db.store.tokens[int(s) : int(s) + int(n)]) for s, n in zip(starts, lengths))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def open_for_knn_lm(paths: list[str], store: Datastore, run_dir: str | Path) -> Databases:
    """The databases, checked against the run's tokenizer (any chunk size) and filtered against ``store``."""
    dbs = open_databases(paths, store.manifest["tokenizer"]["fingerprint"], None, f"run {run_dir}")
    dbs.filter_against(store)
    return dbs


def keys_source(dbs: Databases, record: dict, ckpt_path: Path, store: Datastore, dtype: str, context: int,
                run_dir: str | Path) -> tuple[Path, dict, np.ndarray]:
    """Where the databases' key store lives (a folder whose ``knnlm/`` is the store), its identity and the tokens
    whose positions are the keys."""
    tokens = database_tokens(dbs)
    if len(tokens) < 2:
        raise ValueError("the retrieval databases hold fewer than 2 tokens once filtered: nothing to store for kNN-LM")
    identity = store_identity(record, ckpt_path, store, None, dtype, context)
    identity["datastore"] = {"databases": [{k: d[k] for k in ("path", "corpus_sha256")} for d in dbs.describe()],
                             "excluded_documents": dbs.excluded.get("documents", 0), "tokens": len(tokens),
                             "tokenizer_fingerprint": store.manifest["tokenizer"]["fingerprint"]}
    key = hashlib.sha256(json.dumps(identity["datastore"], sort_keys=True).encode()).hexdigest()[:12]
    return Path(run_dir) / STORE_PARENT / key, identity, tokens


def filter_neighbours(dbs: Databases, store: Datastore, split: str):
    """The databases' chunk neighbours of the scored split, which bucket its chunks for the overlap filter."""
    return database_neighbours(dbs, store, (split,), 2)
