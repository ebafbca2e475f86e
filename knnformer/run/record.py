"""A trained run as the layers above read it: ``load_run`` (the newest checkpoint's model and its run record),
``open_run_datastore`` (the datastore it was trained on, refused if the tokenizer changed) and ``run_neighbours``
(the neighbours it was trained with: the datastore's, or those of its last refresh for a learned retriever).

Evaluation, generation, the kNN-LM, inspection and the ``run:RUN`` embedder all open runs this way, so it lives
in ``run``, below them, rather than in any one of them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from knnformer.config import Config, Derived, RetrievalConfig, config_from_dict
from knnformer.data.chunks import chunk_layout
from knnformer.data.datastore import Datastore
from knnformer.model.transformer import Transformer
from knnformer.retrieval.embedders import make_embedder
from knnformer.retrieval.index import build_dense_index
from knnformer.retrieval.live import Retriever
from knnformer.retrieval.neighbours import load_neighbours
from knnformer.run.checkpoint import latest_checkpoint, load_checkpoint
from knnformer.run.refreshes import load_refresh
from knnformer.run.vectors import LearnedEmbedder, ProjectedEmbedder, reads_embedder


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[Transformer, dict[str, Any], Path]:
    """The model of a run's newest checkpoint, its run record and the checkpoint path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    record = ckpt["config"]
    check_record_matches(run_dir, ckpt["path"], record)
    derived = Derived.of_record(record)
    config = config_from_dict(record["config"])
    # with every default and the current sections, for runs saved before a section existed
    record["config"], record["derived"] = config.to_dict(), dataclasses.asdict(derived)
    model = Transformer(config.model, derived.apply(config.retrieval), derived.retriever_input_dim)
    try:
        model.load_state_dict(ckpt["weights"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {ckpt['path']} does not fit its own config ({str(e)[:200]})") from None
    return model.to(device).eval(), record, ckpt["path"]


def check_record_matches(run_dir: Path, ckpt_path: Path, record: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model settings or datastore differ from the run's ``config.json`` (a checkpoint
    copied from another run, or an edited config): which of the two is meant cannot be guessed."""
    import json

    path = run_dir / "config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
        ours, theirs = saved["config"].get("model", {}), record["config"].get("model", {})
        store_ours = saved["datastore"]["tokenizer_fingerprint"]
        store_theirs = record["datastore"]["tokenizer_fingerprint"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is corrupt or not a run record; delete it only if the checkpoints are the run "
                         "you mean") from None
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differ or store_ours != store_theirs:
        what = ", ".join(f"model.{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in differ[:3]) or "datastore"
        raise ValueError(f"checkpoint {ckpt_path} was trained with other settings than {path} says ({what}); "
                         "the run folder mixes two runs: keep the checkpoints with their own config.json")


def run_config(record: dict[str, Any]) -> Config:
    """The config a run record holds, as the dataclass (older records' flat retrieval keys read too)."""
    return config_from_dict(record["config"])


def run_derived(record: dict[str, Any]) -> Derived:
    """What training derived from the datastore (chunk size, embedder, the frozen vectors' width)."""
    return Derived.of_record(record)


def run_retrieval(record: dict[str, Any]) -> RetrievalConfig:
    """The run's retrieval config with what training derived (chunk size, embedder) filled in: what its model
    was built with and its neighbours are read by."""
    return run_derived(record).apply(run_config(record).retrieval)


def open_run_datastore(record: dict[str, Any], override: str | None = None) -> Datastore:
    """The datastore a run was trained on (or ``override``), refused if its tokenizer differs from the run's."""
    path = override or record["datastore"]["path"]
    if not path:  # a run made by `knnformer import-hf`
        raise ValueError("this run names no datastore (imported from a Hugging Face folder); give --datastore, "
                         "a datastore prepared with the run's tokenizer")
    datastore = Datastore.open(path)
    expected = record["datastore"]["tokenizer_fingerprint"]
    if datastore.manifest["tokenizer"]["fingerprint"] != expected:
        raise ValueError(f"datastore {path} was built with another tokenizer than this run's; "
                         f"evaluate on the datastore the run was trained on, or retrain")
    return datastore


def run_neighbours(record: dict[str, Any], store: Datastore, required: bool, run_dir: str | Path | None = None,
                   hops: int | None = None):
    """The datastore's neighbours as the run was trained with them (for a learned retriever, those of the run's
    last refresh, in ``run_dir``; after ``hops`` hops, default the run's ``retrieval.search.hops``); for a plain LM,
    whatever neighbours the datastore has (for the overlap-filtered figures), or None."""
    rcfg = run_retrieval(record)
    hops = hops or rcfg.search.hops
    if rcfg.enabled and rcfg.search.databases:  # trained against retrieval databases: read them again
        from knnformer.retrieval.database import database_neighbours, open_databases

        dbs = open_databases(rcfg.search.databases.split(","), store.manifest["tokenizer"]["fingerprint"],
                             rcfg.chunk_size, f"run {run_dir or ''}".strip())
        return database_neighbours(dbs, store, ("train", "valid", "test"), rcfg.eval_neighbours or rcfg.num_neighbours)
    refresh = record.get("refresh") or {}
    if rcfg.enabled and refresh.get("id") and run_dir is not None:
        return load_refresh(Path(run_dir) / refresh["folder"], store, chunk_layout(store, rcfg.chunk_size), hops)
    if rcfg.enabled:
        try:
            return load_neighbours(store, rcfg.search.embedder or None, rcfg.chunk_size, hops=hops)
        except ValueError as e:
            if required:
                raise ValueError(f"this run was trained with retrieval and needs its datastore's neighbours: {e}; "
                                 f"or evaluate it as a plain LM with --retrieval off") from None
            return None
    try:
        return load_neighbours(store)
    except ValueError:
        return None


def open_run_retriever(model, store: Datastore, run_dir: str | Path, record: dict):
    """Live retrieval for a learned run that has refreshed: the run's learned retriever embeds the query text
    and an exact (flat) index over its last refresh's train vectors answers, so generation searches what
    training last read. (The query is embedded with the checkpoint's weights, the keys with the weights of the
    refresh, as training's queries were between refreshes.) Memory: the train vectors in float32. None when the
    run never refreshed (its neighbours are the datastore's: use ``open_retriever``)."""
    refresh = record.get("refresh") or {}
    if not refresh.get("id"):
        return None
    rcfg = run_retrieval(record)
    nb = load_refresh(Path(run_dir) / refresh["folder"], store, chunk_layout(store, rcfg.chunk_size))
    index = build_dense_index(nb.vectors[: nb.layout.num_train], "flat")
    name = f"learned:refresh-{refresh['id']}"
    if reads_embedder(rcfg):
        return Retriever(store, nb.layout, index, ProjectedEmbedder(model, make_embedder(rcfg.search.embedder), name))
    return Retriever(store, nb.layout, index, LearnedEmbedder(model, store.tokenizer, name))
