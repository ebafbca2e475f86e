"""``knnformer prepare CORPUS... --out DATASTORE``: read text files, folders or JSONL, split the documents into
train, valid and test, train or pick the tokenizer and write the tokenized datastore, then print its splits."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from knnformer.cli.common import say


def split_documents(docs: list, args) -> list:
    """The documents with their splits: from ``--split-file``, or drawn with the valid and test fractions (their
    defaults depend on whether the corpus is a single document)."""
    from knnformer.data.corpus import apply_split_file, assign_splits, read_split_file

    if args.split_file:
        docs = apply_split_file(docs, read_split_file(args.split_file))
    else:
        single = len(docs) == 1
        db = getattr(args, "tokenizer_from", None) is not None  # a retrieval database: every document retrievable
        valid = args.valid_fraction if args.valid_fraction is not None else (0.0 if db else 0.1 if single else 0.05)
        test = args.test_fraction if args.test_fraction is not None else (0.0 if db or single else 0.05)
        docs = assign_splits(docs, valid, test)
    if not any(d.split == "train" for d in docs):
        raise ValueError("the train split is empty; lower --valid-fraction/--test-fraction or check --split-file")
    return docs


def tokenizer_from(source: str):
    """The tokenizer of a trained run (its datastore's, checked against the run record) or of a datastore."""
    from knnformer.data.datastore import Datastore

    path = Path(source)
    if (path / "manifest.json").is_file():
        return Datastore.open(path).tokenizer
    if not (path / "checkpoints").is_dir():
        raise ValueError(f"--tokenizer-from {source} is neither a run (no checkpoints/) nor a datastore "
                         f"(no manifest.json)")
    from knnformer.run.record import load_run, open_run_datastore

    _, record, _ = load_run(path)
    return open_run_datastore(record).tokenizer


def cmd_prepare(args) -> int:
    from knnformer.data.corpus import list_files, read_documents
    from knnformer.data.datastore import Datastore, build_tokenizer, check_replaceable, write_datastore
    from knnformer.io import claim_folder

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} already exists; pass --force to replace it")
    check_replaceable(out, args.force)
    _claim = claim_folder(out, "prepare")  # one writer per folder; released when this returns
    t0 = time.perf_counter()
    total = sum(p.stat().st_size for p, _ in list_files(args.corpus, args.glob))
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=args.quiet) as bar:
        docs, report = read_documents(args.corpus, args.glob, args.text_field, args.id_field, args.strict, bar.update)
    if report.skipped():
        say(f"skipped {report.num_binary} binary and {report.num_not_utf8} non-UTF-8 files "
            f"(e.g. {report.examples[0]}); pass --strict to refuse them instead")
    docs = split_documents(docs, args)
    if not args.quiet:
        say(f"read {len(docs):,} documents; tokenizer of {args.tokenizer_from}" if args.tokenizer_from else
            f"read {len(docs):,} documents; training the {args.tokenizer} tokenizer" if args.tokenizer == "bpe"
            else f"read {len(docs):,} documents")
    if args.tokenizer_from:
        tokenizer = tokenizer_from(args.tokenizer_from)
    else:
        tokenizer = build_tokenizer(docs, args.tokenizer, args.vocab_size)
    with tqdm(total=len(docs), unit="doc", desc="tokenizing", disable=args.quiet) as bar:
        write_datastore(out, docs, tokenizer, [str(Path(c).resolve()) for c in args.corpus], args.force, bar.update)
    store = Datastore.open(out)
    splits = store.manifest["splits"]
    print(f"datastore {out}: {store.manifest['num_tokens']:,} tokens ({tokenizer.kind}, vocab {tokenizer.vocab_size}) "
          f"in {time.perf_counter() - t0:.1f}s")
    for name, info in splits.items():
        print(f"  {name:<5}  {info['documents']:>7,} documents  {info['tokens']:>12,} tokens  "
              f"{info['bytes']:>12,} bytes")
    return 0


def add_prepare_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("prepare", help="tokenize a corpus into a datastore")
    s.add_argument("corpus", nargs="+", help="text files, folders (see --glob) or JSONL files")
    s.add_argument("--out", required=True, help="datastore folder to write")
    s.add_argument("--glob", default="**/*", help="which files to read under a folder (default: all)")
    s.add_argument("--text-field", default=None, help="JSONL field holding the text (default: text)")
    s.add_argument("--id-field", default="id", help="JSONL field holding a record's id (default: id)")
    s.add_argument("--tokenizer", choices=["bytes", "bpe"], default="bytes")
    s.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    s.add_argument("--tokenizer-from", default=None, metavar="RUN",
                   help="use a trained run's (or a datastore's) tokenizer instead of training one, e.g. for a "
                        "retrieval database (--retrieval-db); then every document goes to train unless "
                        "--valid-fraction/--test-fraction say otherwise")
    s.add_argument("--split-file", default=None, help="TSV/CSV with a file column and a split column")
    s.add_argument("--valid-fraction", type=float, default=None,
                   help="share of documents in valid (default 0.05; 0.1 by position for a single document)")
    s.add_argument("--test-fraction", type=float, default=None,
                   help="share of documents in test (default 0.05; 0 for a single document)")
    s.add_argument("--strict", action="store_true", help="refuse binary or non-UTF-8 files instead of skipping")
    s.add_argument("--force", action="store_true", help="replace an existing datastore")
    s.set_defaults(func=cmd_prepare)
    return s
