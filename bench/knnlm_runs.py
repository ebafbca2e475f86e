"""kNN-LM on trained runs, with RETRO's overlap-filtered figures, into one JSON.

    python -m bench.knnlm_runs --out bench/results/knnlm-shakespeare.json bench/work/shakespeare-dense:valid

Each argument is RUN:SPLIT[,SPLIT]. Scoring valid: tuned on valid's first half, its second half scored;
scoring test: tuned on valid. The run's kNN-LM store (RUN/knnlm) is reused when it matches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="RUN:SPLIT[,SPLIT]")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--datastore", default=None, help="score on this datastore (same tokenizer), e.g. a copy that "
                                                     "holds chunk neighbours for the overlap-filtered figures")
    args = p.parse_args()
    from knnformer.eval.knnlm import evaluate_knn_lm

    report = {"command": " ".join(sys.argv), "datastore": args.datastore, "runs": {}}
    for spec in args.runs:
        run, _, splits = spec.rpartition(":")
        for split in splits.split(","):
            r = evaluate_knn_lm(run, split, datastore=args.datastore, threads=args.threads)
            report["runs"].setdefault(run, {})[split] = r
            f = r.get("filtered", {}).get("0.125", {})
            print(f"{run} {split}: LM {r['lm']['bits_per_byte']:.4f} -> kNN-LM {r['bits_per_byte']:.4f} bits/byte "
                  f"({r['scored']}); overlap <= 0.125: LM {r['lm'].get('filtered', {}).get('0.125', {}).get('bits_per_byte')}"
                  f" -> {f.get('bits_per_byte')} ({f.get('fraction')}); {r['seconds']['total']:.1f} s", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
