"""``knnformer demo``: the whole pipeline on a corpus every machine has, Python's own standard library.

It reads a few MB of the standard library's ``.py`` files (found through ``sysconfig``, so nothing is
downloaded), builds a BPE datastore, trains the ``demo`` preset, then builds a retrieval database of more of the
standard library than the model was trained on (prepared with the run's tokenizer and indexed with bm25; copies of
the held-out files are filtered out, with the count printed), and prints side by side the test split's bits per
byte with retrieval off, with the database read by kNN-LM and in context, and the overlap-filtered (alpha 0.125)
figures; then it generates with the database, showing which files served each chunk. Running it again resumes
the run where it stopped and reuses the database (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
import time
from pathlib import Path

DEMO_BYTES = 4_000_000
DATABASE_BYTES = 5_000_000
"""The database: the standard library's first files up to this size (the demo corpus's, held-out ones included,
and 1 MB more): its held-out files are filtered out, and what remains is 1.3x the text the model trains on."""
DEMO_VOCAB = 2048
SKIP_PARTS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "dist-packages"}


def stdlib_sources(max_bytes: int = DEMO_BYTES) -> tuple[Path, list[Path]]:
    """The standard library's ``.py`` files in sorted order, skipping tests and vendored packages, up to
    ``max_bytes`` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if SKIP_PARTS & set(path.relative_to(root).parts):
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        chosen.append(path)
        total += size
        if total >= max_bytes:
            break
    if not chosen:
        raise ValueError(f"found no Python sources under {root}")
    return root, chosen


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def run_demo(out: Path, fresh: bool = False, steps: int | None = None) -> None:
    from knnformer.cli.train import train_with_progress
    from knnformer.config import load_config
    from knnformer.data.corpus import Document, assign_splits
    from knnformer.data.datastore import Datastore, build_tokenizer, write_datastore

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    store_dir, run_dir = out / "datastore", out / "run"
    root, files = stdlib_sources()
    step(f"1/4 corpus: {len(files)} files of Python {sys.version.split()[0]}'s standard library under {root}")
    if (store_dir / "manifest.json").exists():
        store = Datastore.open(store_dir)
        print(f"reusing the datastore in {store_dir} ({store.manifest['num_tokens']:,} tokens)")
    else:
        docs = [Document(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files]
        docs = assign_splits(docs, 0.05, 0.05)
        print(f"training a byte-level BPE tokenizer ({DEMO_VOCAB} tokens) on the train split ...", flush=True)
        tokenizer = build_tokenizer(docs, "bpe", DEMO_VOCAB)
        write_datastore(store_dir, docs, tokenizer, [str(root)], overwrite=True)
        store = Datastore.open(store_dir)
        for name, info in store.manifest["splits"].items():
            print(f"  {name:<5} {info['documents']:>5} files  {info['tokens']:>9,} tokens  {info['bytes']:>10,} bytes")

    overrides = [f"train.steps={steps}"] if steps else []
    config = load_config("demo", overrides)
    config.model.vocab_size = store.tokenizer.vocab_size
    resume = (run_dir / "config.json").exists() and not fresh
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    from knnformer.run.checkpoint import list_checkpoints

    resume = resume and bool(list_checkpoints(run_dir))
    step(f"2/4 training a {config.model.num_layers}-layer, {config.model.dim}-wide model for "
         f"{config.train.steps} steps" + (" (resuming)" if resume else "") + f" -> {run_dir}")
    if resume:
        import json

        from knnformer.config import config_from_dict

        config = config_from_dict(json.loads((run_dir / "config.json").read_text())["config"])
    train_with_progress(run_dir, store, config, resume)

    db_dir = out / "database"
    root, db_files = stdlib_sources(DATABASE_BYTES)
    step(f"3/4 a retrieval database: {len(db_files)} files of the standard library, {len(db_files) - len(files)} "
         f"more than the corpus, with the run's tokenizer -> {db_dir}")
    build_database(db_dir, root, db_files, store)
    results = compare_modes(run_dir, db_dir)

    step("4/4 generating with the database, and the files that served each chunk")
    generate_with_database(run_dir, store, db_dir, "def ")
    best = min(results, key=lambda m: results[m]["bits_per_byte"])
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s. Next: `knnformer evaluate {run_dir} --retrieval-db "
          f"{db_dir} --mode {best}`, `knnformer generate {run_dir} --retrieval-db {db_dir} --show-neighbours "
          f"--prompt 'import '`, or your own text with `knnformer prepare DOCS --out DB --tokenizer-from "
          f"{run_dir}` and `knnformer index DB`.")


def generate_with_database(run_dir: Path, store, db_dir: Path, prompt: str, max_new_tokens: int = 96) -> None:
    """Sample from the run with the database's neighbours in context, then list the files that served each chunk
    (``knnformer generate RUN --retrieval-db DB --show-neighbours``)."""
    from knnformer.cli.generate import print_neighbours
    from knnformer.run.record import load_run
    from knnformer.serve.generate import RetrievingGenerator, stream_text

    model, record, _ = load_run(run_dir)
    generator = RetrievingGenerator.for_databases(model, store, run_dir, record, [str(db_dir)], mode="in-context",
                                                  k=2)
    sys.stdout.write(prompt)
    ids = store.tokenizer.encode(prompt)
    new: list[int] = []
    for piece in stream_text(store.tokenizer, (new.append(i) or i for i in generator.sample(
            ids, max_new_tokens, temperature=0.8, top_k=50, seed=0, stop_id=store.tokenizer.eot_id))):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print_neighbours(generator.provenance(ids + new, len(ids)), sorted(generator.latencies_ms))


def build_database(db_dir: Path, root: Path, files: list[Path], store) -> None:
    """Prepare ``files`` with the datastore's tokenizer (every file in train: all of it may be retrieved) and index
    it with bm25; reused when already indexed with this tokenizer."""
    import json

    from knnformer.data.corpus import Document
    from knnformer.data.datastore import write_datastore
    from knnformer.retrieval.build import index_datastore

    manifest = db_dir / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if m["tokenizer"]["fingerprint"] == store.manifest["tokenizer"]["fingerprint"] and "index" in m.get(
                "retrieval", {}):
            print(f"reusing the database in {db_dir} ({m['num_tokens']:,} tokens)")
            return
    t0 = time.perf_counter()
    docs = [Document(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    write_datastore(db_dir, docs, store.tokenizer, [str(root)], overwrite=True)
    t1 = time.perf_counter()
    info = index_datastore(db_dir, neighbours=False)
    m = json.loads(manifest.read_text())
    print(f"prepared {m['num_tokens']:,} tokens in {t1 - t0:.0f}s; indexed {info['index']['num_vectors']:,} chunks "
          f"with bm25 in {time.perf_counter() - t1:.0f}s")


def compare_modes(run_dir: Path, db_dir: Path) -> dict[str, dict]:
    """Test's bits per byte with retrieval off, with the database through kNN-LM and in context, and the figures
    over the chunks that overlap their neighbours by at most 12.5%, side by side."""
    from tqdm import tqdm

    from knnformer.eval.database import evaluate_database

    results, bars = {}, []

    def factory(total: int, what: str = ""):
        bars.append(tqdm(total=total, unit="tok", unit_scale=True, desc=what, leave=False))
        return bars[-1].update

    for mode in ("knn-lm", "in-context"):
        print(f"scoring test with the database, {mode} ...", flush=True)
        try:
            results[mode] = evaluate_database(run_dir, [str(db_dir)], mode, "test", progress_factory=factory,
                                              neighbours=2)
        finally:
            for bar in bars:
                bar.close()
            bars.clear()
    ex = results["knn-lm"]["database"]["excluded"]
    print(f"leakage filter: {ex['documents']} database files copy held-out files of the datastore; their "
          f"{ex['chunks']:,} chunks are never retrieved")
    print(f"\n{'test, bits per byte':<34}{'retrieval off':>15}{'with the database':>19}{'change':>9}"
          f"{'alpha 0.125: off':>19}{'with':>9}{'share':>7}")
    for mode, r in results.items():
        f, fo = r["filtered"]["0.125"], r["retrieval_off"]["filtered"]["0.125"]
        label = {"knn-lm": "kNN-LM (any run, no training)", "in-context": "in context (any run, no training)"}[mode]
        print(f"{label:<34}{r['retrieval_off']['bits_per_byte']:>15.4f}{r['bits_per_byte']:>19.4f}"
              f"{-100 * r['gain']:>+8.1f}%{fo['bits_per_byte']:>19.4f}{f['bits_per_byte']:>9.4f}{f['fraction']:>7.0%}")
    print("(retrieval off: the same tokens without the database; kNN-LM's off is the plain model over consecutive "
          "windows, in context's over sliding windows of the full context, more history than the in-context "
          "windows have; alpha 0.125: only the chunks sharing at most 2 tokens in a row with their neighbours)")
    return results


def cmd_demo(args) -> int:
    run_demo(Path(args.out), fresh=args.fresh, steps=args.steps)
    return 0


def add_demo_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("demo", help="prepare, train, evaluate and sample on Python's own standard library")
    s.add_argument("--out", default="knnformer-demo", help="folder for the demo's datastore and run")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: the demo preset's)")
    s.add_argument("--fresh", action="store_true", help="start the demo run over instead of resuming it")
    s.set_defaults(func=cmd_demo)
    return s
