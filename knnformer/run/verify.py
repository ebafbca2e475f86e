"""``knnformer verify DS|RUN``: read every file of a datastore or a run and check its content, not only its size.

A datastore: the manifest's keys, ``tokens.bin`` against its sha256 and the tokenizer's vocabulary (every id),
the document table, and when indexed: the faiss index's vector count against the train chunks, the neighbour
ids (sha256, range) and a sample of them against the leakage rules the manifest says they were built with.
A run: its record, and every checkpoint's checksums, state and optimizer (read without unpickling code), its
weights against its config, and its config against the run's ``config.json``.

``verify`` returns one line per check; a failed check is a line starting ``FAIL``, naming the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from knnformer.data.chunks import chunk_layout, read_retrieval_manifest
from knnformer.data.datastore import Datastore, check_token_ids, is_datastore
from knnformer.retrieval.live import open_index
from knnformer.retrieval.neighbours import check_neighbour_ids, load_neighbours
from knnformer.retrieval.search import excluded_ranges
from knnformer.run.checkpoint import list_checkpoints, load_checkpoint

LEAKAGE_SAMPLE = 4096
"""Query chunks whose neighbours ``verify`` checks against the leakage rules (all of them in a smaller store)."""


def verify(path: str | Path, seed: int = 0) -> list[tuple[bool, str]]:
    """``(ok, line)`` for every check of the datastore or run at ``path``."""
    path = Path(path)
    if not path.is_dir():
        return [(False, f"{path} is not a folder; give a datastore or a run folder")]
    if is_datastore(path):
        return verify_datastore(path, seed)
    if (path / "config.json").is_file() or (path / "checkpoints").is_dir():
        return verify_run(path)
    return [(False, f"{path} is neither a datastore (manifest.json) nor a run (config.json, checkpoints/)")]


def _check(results: list, what: str, fn) -> object:
    """Run one check: append ``(True, what)`` or ``(False, what: the error)``; return ``fn()``'s value or None."""
    try:
        value = fn()
    except ValueError as e:
        results.append((False, f"{what}: {e}"))
        return None
    except OSError as e:
        results.append((False, f"{what}: {e.filename or ''} {e.strerror or e}".strip()))
        return None
    results.append((True, what))
    return value


def verify_datastore(path: Path, seed: int = 0) -> list[tuple[bool, str]]:
    results: list[tuple[bool, str]] = []
    store = _check(results, f"{path}: manifest, tokenizer, tokens.bin sha256", lambda: Datastore.open(path))
    if store is None:
        return results
    if "tokens_sha256" not in store.manifest:
        results.append((True, (f"{path}/tokens.bin: no sha256 recorded (built by an earlier knnformer; "
                               "`knnformer prepare --force` records one)")))
    _check(results, f"{path}/tokens.bin: every id below the vocabulary ({store.tokenizer.vocab_size})",
           lambda: check_token_ids(path, store.tokens, store.tokenizer.vocab_size))
    _check(results, f"{path}/docs.npy: documents tile tokens.bin", lambda: _check_docs(store))
    retrieval = read_retrieval_manifest(path)
    if "index" in retrieval:
        _check(results, f"{path}/{retrieval['index']['file']}: readable, {retrieval['index']['num_vectors']} vectors",
               lambda: open_index(store))
    if "neighbours" in retrieval:
        nb = _check(results, f"{path}/{retrieval['neighbours']['file']}: sha256, shape", lambda: load_neighbours(store))
        if nb is not None:
            _check(results, f"{path}/{nb.info['file']}: ids are train chunks",
                   lambda: check_neighbour_ids(path / nb.info["file"], nb.ids, nb.layout.num_train))
            _check(results, f"{path}/{nb.info['file']}: leakage rules on a sample "
                            f"(window {nb.info['exclude_window']}, own document "
                            f"{'excluded' if nb.info['exclude_same_document'] else 'allowed'})",
                   lambda: check_leakage_sample(nb, seed))
    if "neighbours_hop2" in retrieval:
        _check(results, f"{path}/{retrieval['neighbours_hop2']['file']}: sha256, shape",
               lambda: load_neighbours(store, hops=2))
    emb = retrieval.get("embeddings")
    if emb is not None:
        from knnformer.retrieval.embedders import open_embeddings

        _check(results, f"{path}/{emb['file']}: {emb['count']} x {emb['dim']} vectors",
               lambda: open_embeddings(path, emb))
    return results


def _check_docs(store: Datastore) -> None:
    docs = store.docs
    ends = docs["start"] + docs["length"]
    if len(docs) and (docs["start"][0] != 0 or np.any(docs["start"][1:] != ends[:-1])
                      or int(ends[-1]) != len(store.tokens)):
        raise ValueError(f"{store.path}/docs.npy does not tile tokens.bin; rebuild with `knnformer prepare --force`")


def check_leakage_sample(nb, seed: int = 0, sample: int = LEAKAGE_SAMPLE) -> None:
    """Refuse neighbours that break the leakage rules the manifest names (exclude_window tokens around a train
    chunk; its own documents in a multi-document corpus), checked on ``sample`` train chunks drawn at random."""
    layout, n = chunk_layout(nb.store, nb.info["chunk_size"]), nb.layout.num_train
    q = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    lo, hi = excluded_ranges(layout, q, nb.info["exclude_window"], nb.info["exclude_same_document"])
    ids = np.asarray(nb.ids[q], dtype=np.int64)
    bad = (ids >= 0) & (ids >= lo[:, None]) & (ids < hi[:, None])
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{bad.any(axis=1).sum()} of {len(q)} sampled chunks have a neighbour the leakage rules "
                         f"exclude (chunk {int(q[row])} -> {int(ids[row][bad[row]][0])}); rebuild with "
                         f"`knnformer index {nb.store.path} --force`")


def verify_run(path: Path) -> list[tuple[bool, str]]:
    from knnformer.run.record import load_run

    results: list[tuple[bool, str]] = []
    record_path = path / "config.json"
    record = _check(results, f"{record_path}: readable run record", lambda: _read_record(record_path))
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        results.append((False, f"{path} has no checkpoint; train one with `knnformer train DATASTORE --out {path}`"))
    for ckpt in checkpoints:
        _check(results, f"{ckpt}: checksums, weights, state and optimizer (no code run)",
               lambda c=ckpt: _check_state(c))
    if checkpoints:
        _check(results, f"{checkpoints[-1]}: weights fit the config, config matches {record_path.name}",
               lambda: load_run(path))
    if record is not None:
        store_path = Path(record["datastore"]["path"])
        if is_datastore(store_path):
            _check(results, f"{store_path}: the run's datastore opens (tokens.bin sha256)",
                   lambda: Datastore.open(store_path))
        else:
            results.append((True, f"{store_path}: the run's datastore is not here (evaluate with --datastore)"))
    return results


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
        record["config"]["model"], record["datastore"]["path"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is corrupt or not a run record ({e})") from None
    return record


def _check_state(ckpt: Path) -> None:
    loaded = load_checkpoint(ckpt, with_optimizer=True)
    step = loaded["state"].get("step") if isinstance(loaded["state"], dict) else None
    if step != int(ckpt.name.split("-")[1]):
        raise ValueError(f"{ckpt}: its state says step {step}, its name step {ckpt.name}; delete it to fall back to "
                         "an older checkpoint")
