"""What continuous batching buys, without HTTP: the server's engine in this process, the same requests run one
at a time and all at once, interleaved round by round (the HTTP load test, bench/serve_load.py, adds the event
loop, the clients and the machine's other load to this).

    python -m bench.serve_batching --run RUN [--requests 16] [--max-tokens 64] [--rounds 3]

Goal (issue 12): aggregate tokens/s with batching >= 3x one client's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from bench.generate_cache import cpu_flags
from bench.speed import git_state, machine


def run_requests(engine, prompts: list[list[int]], max_tokens: int, together: bool) -> float:
    """Seconds to complete every prompt: submitted all at once, or each after the previous finished."""
    from knnformer.serve.batcher import Request

    t0 = time.perf_counter()
    groups = [prompts] if together else [[p] for p in prompts]
    for group in groups:
        finished = threading.Semaphore(0)

        def emit(ev, finished=finished):
            if "done" in ev or "error" in ev:
                finished.release()

        for i, p in enumerate(group):
            engine.submit(Request(p, max_tokens, emit, 0.8, None, i, True, []))
        for _ in group:
            finished.acquire()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve-batching.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from knnformer.serve.server import open_service

    service = open_service(args.run, max_batch=args.requests, max_queue=args.requests)
    valid = service.store.split_tokens("valid")
    rng = random.Random(0)
    prompts = []
    for _ in range(args.requests):
        at = rng.randrange(0, len(valid) - 200)
        prompts.append([int(t) for t in valid[at : at + rng.randrange(32, 160)]])
    tokens = args.requests * args.max_tokens
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {"one_at_a_time": [], "all_at_once": []}
    try:
        for r in range(args.rounds):
            order = list(seconds) if r % 2 == 0 else list(seconds)[::-1]
            for name in order:
                seconds[name].append(run_requests(service.engine, prompts, args.max_tokens, name == "all_at_once"))
            print(f"round {r}: " + ", ".join(f"{n} {tokens / s[-1]:.1f} tok/s" for n, s in seconds.items()),
                  flush=True)
    finally:
        service.close()
    tps = {n: tokens / statistics.median(s) for n, s in seconds.items()}
    ratio = tps["all_at_once"] / tps["one_at_a_time"]
    out = {"command": " ".join(["python -m bench.serve_batching", *sys.argv[1:]]), "commit": git_state(),
           "run": args.run, "requests": args.requests, "max_tokens": args.max_tokens, "seconds": seconds,
           "tokens_per_s_median": tps, "ratio": ratio, "goal": {"ratio_at_least": 3.0, "met": ratio >= 3},
           "machine": {**machine(), "flags": cpu_flags(), "load_before": load_before, "load_after": os.getloadavg()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"one at a time {tps['one_at_a_time']:.1f} tok/s, {args.requests} at once {tps['all_at_once']:.1f} tok/s: "
          f"{ratio:.2f}x (goal >= 3x: {'met' if ratio >= 3 else 'NOT met'}) -> {args.out}")


if __name__ == "__main__":
    main()
