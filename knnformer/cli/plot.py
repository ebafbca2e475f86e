"""``knnformer plot RUN [RUN ...] --out FILE.png``: loss and bits per byte of one or several runs against steps
and wall-clock time, with refreshes, Performer redraws and MoE drop rates marked, and bars for evaluation JSONs
(``--eval``); see ``knnformer/run/plots.py``."""

from __future__ import annotations

import argparse


def cmd_plot(args) -> int:
    from knnformer.run.plots import plot_runs

    if args.names and len(args.names) != len(args.runs):
        raise ValueError(f"--name was given {len(args.names)} times for {len(args.runs)} runs; give one per run")
    out = plot_runs(args.runs, args.out, args.eval or [], args.names)
    print(f"wrote {out}")
    return 0


def add_plot_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("plot", help="draw runs' loss and bits-per-byte curves (and evaluation bars) into a PNG")
    s.add_argument("runs", nargs="*", metavar="RUN", help="run folders (or metrics.jsonl files)")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("--eval", action="append", metavar="JSON",
                   help="an evaluation JSON (`knnformer evaluate RUN --json > FILE`): bars of bits per byte with "
                        "retrieval on and off and at alpha 0.125; repeatable")
    s.add_argument("--name", dest="names", action="append", metavar="NAME", help="legend name of each run, in order")
    s.set_defaults(func=cmd_plot)
    return s
