"""``knnformer demo``: the whole pipeline on a corpus every machine has, Python's own standard library.

It reads a few MB of the standard library's ``.py`` files (found through ``sysconfig``, so nothing is
downloaded), builds a BPE datastore, trains the ``demo`` preset, scores valid and test, and prints a sample.
Running it again resumes the run where it stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
import time
from pathlib import Path

DEMO_BYTES = 4_000_000
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
    from knnformer.eval.evaluate import evaluate_run, format_table
    from knnformer.run.record import load_run
    from knnformer.serve.generate import sample_ids, stream_text

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

    step("3/4 scoring every token of valid and test")
    for split in ("valid", "test"):
        if store.manifest["splits"][split]["tokens"] > 1:
            print(format_table(evaluate_run(run_dir, split)))

    step("4/4 a sample, prompted with 'def '")
    model, _, _ = load_run(run_dir)
    prompt = "def "
    sys.stdout.write(prompt)
    ids = sample_ids(model, store.tokenizer.encode(prompt), 200, temperature=0.8, top_k=50, seed=0)
    for piece in stream_text(store.tokenizer, ids):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print(f"\n\ndemo finished in {time.perf_counter() - t0:.0f}s. Next: `knnformer generate {run_dir} --prompt "
          f"'import '`, or train on your own text with `knnformer prepare` and `knnformer train`.")


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
