"""Generation with retrieval, one client: tokens/s over the KV cache (``RetrievingGenerator.sample``, what
``knnformer generate`` runs now) against the full-window recompute it replaced (``cache=False``), interleaved
round by round in one process, on a run with context 256.

    python -m bench.generate_cache --run RUN [--prompt-tokens 128] [--new-tokens 128] [--rounds 5]

The prompt is taken from the run datastore's valid split; both variants sample the same tokens (checked), so they
do the same retrievals and the ratio is the cost of the model alone. Goal: >= 5x at context 256.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.speed import git_state, machine


def cpu_flags() -> list[str]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    return [f for f in flags if f.startswith(("avx", "amx", "fma"))]


def timed(gen, prompt, args, cache: bool) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    ids = list(gen.sample(prompt, args.new_tokens, temperature=0.8, top_k=None, seed=0, cache=cache))
    return ids, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a retrieval run (context 256 for the goal)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate-cache.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from knnformer.run.record import load_run, open_run_datastore
    from knnformer.serve.generate import RetrievingGenerator

    model, record, _ = load_run(args.run)
    store = open_run_datastore(record)
    context = model.config.context
    if args.prompt_tokens + args.new_tokens > context:
        raise SystemExit(f"prompt + new tokens must fit the context ({context}) so both variants do the same work")
    prompt = [int(t) for t in store.split_tokens("valid")[: args.prompt_tokens]]
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"kv_cache": [], "recompute": []}
    same = True
    for r in range(args.rounds):
        order = ["kv_cache", "recompute"] if r % 2 == 0 else ["recompute", "kv_cache"]
        outs = {}
        for name in order:
            gen = RetrievingGenerator.for_run(model, store, args.run, record)
            outs[name], seconds = timed(gen, prompt, args, cache=name == "kv_cache")
            times[name].append(seconds)
        same &= outs["kv_cache"] == outs["recompute"]
        print(f"round {r}: " + ", ".join(f"{n} {args.new_tokens / times[n][-1]:.1f} tok/s" for n in times),
              flush=True)
    tps = {n: args.new_tokens / statistics.median(t) for n, t in times.items()}
    ratio = tps["kv_cache"] / tps["recompute"]
    record_out = {
        "command": " ".join(["python -m bench.generate_cache", *sys.argv[1:]]), "commit": git_state(),
        "run": str(args.run), "context": context, "model": {"layers": model.config.num_layers,
                                                            "dim": model.config.dim,
                                                            "parameters": model.num_params()},
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "seconds": times, "tokens_per_s_median": tps, "speedup": ratio, "same_tokens": same,
        "goal": {"speedup_at_least": 5.0, "met": ratio >= 5.0},
        "machine": {**machine(), "flags": cpu_flags(), "load_before": load_before, "load_after": os.getloadavg()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record_out, indent=2))
    print(f"KV cache {tps['kv_cache']:.1f} tok/s, recompute {tps['recompute']:.1f} tok/s: {ratio:.2f}x "
          f"(goal >= 5x: {'met' if ratio >= 5 else 'NOT met'}); same tokens: {same}; -> {args.out}")


if __name__ == "__main__":
    main()
