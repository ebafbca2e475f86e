"""``knnformer import-hf DIR --out RUN``: a Llama-shaped Hugging Face checkpoint on disk as a knnformer run; see
``knnformer/export/importer.py``."""

from __future__ import annotations

import argparse


def cmd_import_hf(args) -> int:
    from knnformer.export.importer import import_hf
    from knnformer.io import claim_folder

    _claim = claim_folder(args.out, "import-hf")  # one writer per folder; released when this returns
    summary = import_hf(args.dir, args.out, force=args.force, context=args.context)
    gqa = summary["key_value_heads"]
    heads = f", its {gqa} key/value heads repeated for {summary['heads']} query heads" if gqa < summary["heads"] else ""
    print(f"imported {args.dir} ({summary['parameters']:,} parameters, context {summary['context']}{heads}, "
          f"tokenizer: {summary['tokenizer'] or 'not byte-level, not imported'}) -> {summary['out']}")
    return 0


def add_import_hf_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("import-hf", help="read a Llama-shaped Hugging Face checkpoint folder as a run")
    s.add_argument("dir", help="folder with config.json and model.safetensors (or its shards)")
    s.add_argument("--out", required=True, help="run folder to write")
    s.add_argument("--context", type=int, default=None, help="the run's context (default: max_position_embeddings)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(func=cmd_import_hf)
    return s
