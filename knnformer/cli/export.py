"""``knnformer export RUN --hf OUT_DIR``: a run's decoder as a Hugging Face ``LlamaForCausalLM`` folder
(``MixtralForCausalLM`` for a top-2 MoE run) with tokenizer files ``AutoTokenizer`` loads; see
``knnformer/export/hf.py``."""

from __future__ import annotations

import argparse

from knnformer.cli.common import say


def cmd_export(args) -> int:
    from knnformer.export.hf import export_run
    from knnformer.io import claim_folder

    _claim = claim_folder(args.hf, "export")  # one writer per folder; released when this returns
    summary = export_run(args.run, args.hf, force=args.force, datastore=args.datastore)
    if summary["retrieval_left_out"]:
        say("this run retrieves: its decoder is exported without the retrieval layers (the run with retrieval off); "
            "OUT_DIR/README.md says so")
    print(f"exported {args.run} (step {summary['step']}, {summary['parameters']:,} parameters, "
          f"{summary['tokenizer']} tokenizer) as {summary['architecture']} -> {summary['out']}")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("export", help="write a run as a Hugging Face transformers folder")
    s.add_argument("run")
    s.add_argument("--hf", required=True, metavar="OUT_DIR", help="folder to write (config.json, "
                   "model.safetensors, tokenizer files, README.md)")
    s.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    s.add_argument("--datastore", default=None, help="where the run's datastore is now (default: where it was "
                   "trained), for its tokenizer")
    s.set_defaults(func=cmd_export)
    return s
