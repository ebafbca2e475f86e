"""``knnformer evaluate RUN``: loss, perplexity and bits per byte of a run over a whole split, with and without
its retrieval, or interpolated with a kNN-LM (``--knn-lm``); a table, or JSON with ``--json``."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from knnformer.cli.values import check_evaluate_args


def cmd_evaluate(args) -> int:
    from knnformer.eval.evaluate import evaluate_run, format_table, to_json

    check_evaluate_args(args)  # --stride 0, --batch-size 0: refused, not silently replaced

    bars = []

    def factory(total, what=""):
        bars.append(tqdm(total=total, unit="tok", unit_scale=True, desc=f"scoring {args.split} {what}".strip(),
                         disable=args.json or args.quiet))
        return bars[-1].update

    try:
        if args.knn_lm:
            from knnformer.eval import knnlm

            if args.stride:
                raise ValueError("--knn-lm scores in consecutive windows; drop --stride")
            result = knnlm.evaluate_knn_lm(args.run, args.split, args.datastore, args.batch_size, factory,
                                           args.retrieval)
            table = knnlm.format_table(result)
        else:
            from knnformer.runtime import resolve_device

            result = evaluate_run(args.run, args.split, args.stride, args.datastore, args.batch_size, factory,
                                  args.retrieval, args.neighbour_gain, str(resolve_device(args.device or "cpu")))
            table = format_table(result)
    finally:
        for bar in bars:
            bar.close()
    print(to_json(result) if args.json else table)
    return 0


def add_evaluate_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("evaluate", help="loss, perplexity and bits per byte over a whole split")
    s.add_argument("run")
    s.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    s.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: the context)")
    s.add_argument("--datastore", default=None, help="datastore to score (default: the run's own)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--retrieval", choices=["auto", "on", "off"], default="auto",
                   help="score with the run's retrieval on (also reports off) or as a plain LM (default: on for "
                        "a retrieval run)")
    s.add_argument("--knn-lm", action="store_true",
                   help="interpolate with a kNN-LM over the run's train hidden states (lambda, k and temperature "
                        "tuned on data not scored: valid for test, valid's first half for its second)")
    s.add_argument("--neighbour-gain", type=int, default=8, metavar="N",
                   help="measure how much each neighbour lowered the loss of the chunk it served on N windows "
                        "(one extra forward per neighbour and chunk; 0: skip; default 8)")
    s.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    s.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default cpu; not with --knn-lm, "
                   "which scores on the CPU)")
    s.set_defaults(func=cmd_evaluate)
    return s
