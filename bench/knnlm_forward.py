"""The forward pass that makes kNN-LM's keys: positions per second of ``split_hidden_states`` (the store's own
code: windows of the context, hidden states written fp16 into an array) for batch sizes, eager against
``torch.compile``, on real train tokens, with the run's model (or a fresh one of its shape) in bf16 autocast.

Variants run interleaved in rounds (every variant once a round, rotating order), so load from other processes
falls on all alike; reported: each variant's median positions/s, its ratio to the eager batch-32 pass (the
store's setting before this benchmark), and the one-off compile time. Also timed: the fp32 -> fp16 conversion of
one batch's hidden states by numpy (what the store did) and by torch.

    python -m bench.knnlm_forward bench/work/gut-small [--windows 64] [--rounds 5]
        [--out bench/results/knnlm-forward.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.speed import git_state, machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--windows", type=int, default=64, help="context windows a variant computes a round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", default="8,16,32")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="bench/results/knnlm-forward.json")
    args = p.parse_args()

    from knnformer.eval.knnlm.store import split_hidden_states
    from knnformer.run.record import load_run, open_run_datastore

    model, record, _ = load_run(args.run)
    store = open_run_datastore(record)
    context, dim = model.config.context, model.config.dim
    tokens = np.asarray(store.split_tokens("train")[: args.windows * context + 1])
    positions = len(tokens) - 1
    out = np.empty((positions, dim), dtype=np.float16)
    variants = [(b, c) for c in (False, True) for b in [int(x) for x in args.batches.split(",")]]
    load_before = os.getloadavg()
    compile_seconds = {}
    for b, c in variants:  # warm up; a compiled variant compiles here
        t0 = time.perf_counter()
        split_hidden_states(model, tokens, out, b, args.dtype, compile=c)
        if c:
            compile_seconds[b] = round(time.perf_counter() - t0, 2)
    times: dict[str, list[float]] = {f"b{b}-{'compiled' if c else 'eager'}": [] for b, c in variants}
    for r in range(args.rounds):
        for b, c in variants[r % len(variants):] + variants[: r % len(variants)]:
            t0 = time.perf_counter()
            split_hidden_states(model, tokens, out, b, args.dtype, compile=c)
            times[f"b{b}-{'compiled' if c else 'eager'}"].append(time.perf_counter() - t0)
            print(f"round {r} b{b} {'compiled' if c else 'eager'}: {positions / times[f'b{b}-' + ('compiled' if c else 'eager')][-1]:,.0f} positions/s",
                  file=sys.stderr, flush=True)
    base = statistics.median(times["b32-eager"]) if "b32-eager" in times else None
    result = {name: {"positions_per_second": round(positions / statistics.median(t)),
                     "per_round": [round(positions / x) for x in t],
                     "speedup_vs_b32_eager": round(base / statistics.median(t), 3) if base else None}
              for name, t in times.items()}
    h = torch.randn(32, context, dim)
    conv = {}
    for name, fn in (("numpy", lambda: h.numpy().astype(np.float16)), ("torch", lambda: h.half().numpy())):
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        conv[name] = statistics.median(ts)
    report = {"command": " ".join(["python -m bench.knnlm_forward", *sys.argv[1:]]), "git": git_state(),
              "machine": machine(), "load_before": load_before, "load_after": os.getloadavg(),
              "run": args.run, "model": {"layers": model.config.num_layers, "dim": dim, "context": context,
                                         "params": model.num_params()},
              "dtype": args.dtype, "positions_per_round": positions, "rounds": args.rounds,
              "compile_seconds": compile_seconds, "variants": result,
              "fp16_conversion_of_one_batch_32": {"numpy_seconds": round(conv["numpy"], 4),
                                                  "torch_seconds": round(conv["torch"], 4),
                                                  "values": h.numel()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["variants"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
