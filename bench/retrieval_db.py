"""Retrieval that pays (issue 13): a retrieval database beyond the training data, and new knowledge without training.

    python -m bench.retrieval_db prepare              # datastores, databases and their bm25 indexes
    python -m bench.retrieval_db train MODEL...       # sympy-q, sympy-all, sympy-q-retro, gutenberg (background, nice)
    python -m bench.retrieval_db sympy                # 1: the sympy database at 1x / 2x / 4x -> results JSON
    python -m bench.retrieval_db docs                 # 2: a Gutenberg model scored on the Python docs

1. SymPy, BPE 4096 trained on a quarter of the train files (by a hash of the path), split by file (5/5%):
   ``sympy-q`` (a dense model trained on that quarter), ``sympy-all`` (a dense model trained on all train files for
   the same steps: a dense step costs the same whatever the corpus, so equal steps is equal training compute),
   ``sympy-q-retro`` (RETRO with K = 1 and a D/4 encoder, trained on the quarter for steps / 1.17, the interleaved
   step ratio ``bench/retro_step.py`` measured for that setting on sympy). Databases of the quarter's, half's and all
   train files (1x, 2x, 4x the training files), prepared with the quarter's tokenizer, all documents in train.
2. Gutenberg, BPE 4096 trained on a quarter of the train books (the MANIFEST's split; as in issue 3): a dense
   model. The Python docs prepared with its tokenizer, split by file (10/10%); the database holds the docs' train
   files; the fine-tune trains the same model on the docs' train files for as long as preparing and indexing the
   database (and, for kNN-LM, building its key store) took.

Models train on one thread each; results go to ``bench/results/retrieval-db-*.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data"
WORK = ROOT / "bench" / "work" / "retrieval-db"
PRESET = "shakespeare-char"  # 4 layers x 128, context 64, batch 12: the issue-3 setting
STEPS = 1000
RETRO_STEP_RATIO = 1.17  # bench/retro_step.py, sympy BPE 4096, K = 1, encoder D/4 (BENCHMARKS.md, issue 3)
RETRO_SETS = ["retrieval.enabled=true", "retrieval.num_neighbours=1", "retrieval.encoder_dim=32"]


def _quarter(doc_id: str, parts: int) -> int:
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % parts


def prepare(data: Path) -> None:
    """Every datastore and database of both benchmarks, each built once (kept when its manifest exists)."""
    from knnformer.data.corpus import Document, apply_split_file, assign_splits, read_documents, read_split_file
    from knnformer.data.datastore import Datastore, build_tokenizer, write_datastore
    from knnformer.retrieval.build import index_datastore

    WORK.mkdir(parents=True, exist_ok=True)
    timings = {}

    def write(name: str, docs: list, tokenizer, sources: list[str]) -> None:
        if not (WORK / name / "manifest.json").exists():
            t0 = time.perf_counter()
            write_datastore(WORK / name, docs, tokenizer, sources, True)
            timings[f"{name}:prepare"] = round(time.perf_counter() - t0, 2)

    def index(name: str) -> None:
        if "index" not in json.loads((WORK / name / "manifest.json").read_text()).get("retrieval", {}):
            t0 = time.perf_counter()
            index_datastore(WORK / name)
            timings[f"{name}:index"] = round(time.perf_counter() - t0, 2)

    # 1. sympy
    src = [str((data / "sympy-1.13.3").resolve())]
    docs, _ = read_documents(src, "**/*.py.txt")
    docs = assign_splits(docs, 0.05, 0.05)
    train = [d for d in docs if d.split == "train"]
    quarter = [d for d in train if _quarter(d.doc_id, 4) == 0]
    half = [d for d in train if _quarter(d.doc_id, 4) in (0, 1)]
    held = [d for d in docs if d.split != "train"]
    if not (WORK / "sympy-q" / "manifest.json").exists():
        write("sympy-q", quarter + held, build_tokenizer(quarter, "bpe", 4096), src)
    tok = Datastore.open(WORK / "sympy-q").tokenizer
    write("sympy-all", train + held, tok, src)
    for name, part in (("sympy-db-1x", quarter), ("sympy-db-2x", half), ("sympy-db-4x", train)):
        write(name, [Document(d.doc_id, d.text, "train") for d in part], tok, src)
    for name in ("sympy-q", "sympy-db-1x", "sympy-db-2x", "sympy-db-4x"):
        index(name)

    # 2. gutenberg -> python docs
    gsrc = [str((data / "gutenberg" / "books").resolve())]
    if not (WORK / "gutenberg" / "manifest.json").exists():
        gdocs, _ = read_documents(gsrc, "**/*")
        gdocs = apply_split_file(gdocs, read_split_file(str((data / "gutenberg" / "MANIFEST.tsv").resolve())))
        gdocs = [d for d in gdocs if d.split != "train" or _quarter(d.doc_id, 4) == 0]
        write("gutenberg", gdocs, build_tokenizer([d for d in gdocs if d.split == "train"], "bpe", 4096), gsrc)
    gtok = Datastore.open(WORK / "gutenberg").tokenizer
    psrc = [str((data / "python-docs-3.11" / "docs").resolve())]
    pdocs, _ = read_documents(psrc, "**/*")
    pdocs = assign_splits(pdocs, 0.1, 0.1)
    t0 = time.perf_counter()
    write("docs", pdocs, gtok, psrc)
    write("docs-db", [d for d in pdocs if d.split == "train"], gtok, psrc)
    index("docs-db")
    if timings.get("docs-db:index"):
        timings["docs-db:prepare+index"] = round(time.perf_counter() - t0 - timings.get("docs:prepare", 0), 2)
    old = json.loads((WORK / "timings.json").read_text()) if (WORK / "timings.json").exists() else {}
    (WORK / "timings.json").write_text(json.dumps({**old, **timings}, indent=1))
    print(json.dumps(timings, indent=1))


MODELS = {
    "sympy-q": ("sympy-q", STEPS, []),
    "sympy-all": ("sympy-all", STEPS, []),
    "sympy-q-retro": ("sympy-q", round(STEPS / RETRO_STEP_RATIO), RETRO_SETS),
    "gutenberg": ("gutenberg", STEPS, []),
}


def train_model(name: str) -> None:
    from knnformer.config import load_config
    from knnformer.data.datastore import Datastore
    from knnformer.train.trainer import train

    store_name, steps, sets = MODELS[name]
    run = WORK / f"run-{name}"
    if (run / "checkpoints" / f"step-{steps:07d}").is_dir():
        print(f"{run} done")
        return
    store = Datastore.open(WORK / store_name)
    config = load_config(PRESET, [f"train.steps={steps}", f"train.checkpoint_interval={steps}", "train.threads=1",
                                  *sets])
    config.model.vocab_size = store.tokenizer.vocab_size
    t0 = time.perf_counter()
    train(run, store, config, resume=(run / "checkpoints").is_dir())
    (run / "bench-seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - t0,
                                                        "loadavg": os.getloadavg()}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["prepare", "train", "sympy", "docs"])
    p.add_argument("models", nargs="*")
    p.add_argument("--data", default=DEFAULT_DATA)
    args = p.parse_args()
    if args.stage == "prepare":
        prepare(Path(args.data))
    elif args.stage == "train":
        for name in args.models:
            train_model(name)


if __name__ == "__main__":
    main()
