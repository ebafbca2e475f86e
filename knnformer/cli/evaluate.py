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

    def knn_factory(total, what=""):  # every kNN-LM stage, with its time left, whether or not --json
        if bars:
            bars[-1].close()
        bars.append(tqdm(total=total, unit_scale=True, desc=what, disable=args.quiet, mininterval=1.0))
        return bars[-1].update

    try:
        if args.retrieval_db:
            from knnformer.eval.database import evaluate_database
            from knnformer.eval.database import format_table as database_table

            if args.knn_lm:
                raise ValueError("with --retrieval-db, pick the way to read it with --mode knn-lm, not --knn-lm")
            result = evaluate_database(args.run, args.retrieval_db, args.mode, args.split, args.datastore,
                                       args.batch_size or 32, factory, args.neighbours, args.stride)
            table = database_table(result)
        elif args.knn_lm:
            from knnformer.eval import knnlm

            if args.stride:
                raise ValueError("--knn-lm scores in consecutive windows; drop --stride")
            result = knnlm.evaluate_knn_lm(args.run, args.split, args.datastore, args.batch_size, knn_factory,
                                           args.retrieval, k_max=args.knn_k_max, index=args.knn_index,
                                           nprobe=args.knn_nprobe, refine=args.knn_refine,
                                           memory_budget=int(args.memory_budget * (1 << 30)),
                                           max_keys=args.knn_max_keys, recall_target=args.knn_recall,
                                           tune_queries=args.knn_tune_queries, exact_sample=args.knn_exact_sample)
            table = knnlm.format_table(result)
        else:
            from knnformer.runtime import resolve_device

            result = evaluate_run(args.run, args.split, args.stride, args.datastore, args.batch_size or 32, factory,
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
    s.add_argument("--batch-size", type=int, default=None,
                   help="windows a forward pass computes (default 32; with --knn-lm, as many as make 2,048 "
                        "positions, which measured fastest for its keys)")
    s.add_argument("--retrieval", choices=["auto", "on", "off"], default="auto",
                   help="score with the run's retrieval on (also reports off) or as a plain LM (default: on for "
                        "a retrieval run)")
    s.add_argument("--knn-lm", action="store_true",
                   help="interpolate with a kNN-LM over the run's train hidden states (lambda, k and temperature "
                        "tuned on data not scored: valid for test, valid's first half for its second)")
    s.add_argument("--knn-index", choices=["auto", "exact", "ivf", "ivfpq"], default="auto",
                   help="kNN-LM key search: exact, IVF over the fp16 keys, or IVF-PQ re-scored from them; auto "
                        "picks by the work of exact search and --memory-budget")
    s.add_argument("--knn-k-max", type=int, default=256, help="largest k tried when tuning kNN-LM (default 256)")
    s.add_argument("--knn-max-keys", type=int, default=None, metavar="N",
                   help="kNN-LM over the first N train positions only (the store grows to more without recomputing)")
    s.add_argument("--knn-recall", type=float, default=0.99,
                   help="recall@k against exact search that kNN-LM's nprobe and refine are chosen to reach, "
                        "measured on a sample of the tuning tokens (default 0.99)")
    s.add_argument("--knn-nprobe", type=int, default=None, help="fix the IVF lists searched (default: by recall)")
    s.add_argument("--knn-refine", type=int, default=None,
                   help="fix IVF-PQ's candidates re-scored exactly, as a multiple of k (default: by recall)")
    s.add_argument("--knn-tune-queries", type=int, default=32_768,
                   help="tuning tokens searched with --knn-k-max and tuned on, a seeded sample (default 32768)")
    s.add_argument("--knn-exact-sample", type=int, default=1000,
                   help="tuning tokens searched exactly, for recall and the gain against exact (default 1000)")
    s.add_argument("--memory-budget", type=float, default=2.0,
                   help="GiB kNN-LM's index may hold; the keys are kept in memory for re-scoring when they fit "
                        "beside it, and an index that cannot fit is refused (default 2)")
    s.add_argument("--neighbour-gain", type=int, default=8, metavar="N",
                   help="measure how much each neighbour lowered the loss of the chunk it served on N windows "
                        "(one extra forward per neighbour and chunk; 0: skip; default 8)")
    s.add_argument("--retrieval-db", action="extend", nargs="+", default=[], metavar="DB",
                   help="retrieval databases (datastores prepared with --tokenizer-from RUN and indexed) to read "
                        "instead of the run's own; several are searched as one; copies of held-out documents are "
                        "excluded, with the count printed")
    s.add_argument("--mode", choices=["auto", "cca", "knn-lm", "in-context"], default="auto",
                   help="how the run reads --retrieval-db: RETRO's cross-attention (a RETRO run), kNN-LM or the "
                        "neighbours' text in context (any run); auto: cca for a RETRO run, else knn-lm")
    s.add_argument("--neighbours", type=int, default=1, metavar="N",
                   help="--mode in-context: neighbours placed before each window (default 1)")
    s.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    s.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default cpu; not with --knn-lm, "
                   "which scores on the CPU)")
    s.set_defaults(func=cmd_evaluate)
    return s
