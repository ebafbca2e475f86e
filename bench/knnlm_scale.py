"""kNN-LM at the size of a real database: the whole valid split of a run evaluated with its first N train keys, for
growing N, each in its own process (its peak memory is the process's), with every stage's time.

    nice -n 5 python -m bench.knnlm_scale bench/work/gut-small --sizes 1000000,3000000,10000000 \\
        --out bench/results/knnlm-scale-gutenberg.json

The store in ``RUN/knnlm`` is grown, not rebuilt, from one size to the next (the first N keys of a bigger store are
the store of N keys), so each size's ``keys`` stage is the time to compute only its new keys; ``keys_seconds_total``
adds the smaller sizes' key time, i.e. the cost of building that size's store from nothing. Reported per size: key
build, index build, the exact sample, the searches of the tuning sample and the scored half, tuning, the total, the
process's peak RSS, the load average before and after, the kNN-LM bits per byte on valid[half:] and, on a sample
of tuning tokens, the gain with the chosen search against the gain with exact search.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.speed import git_state, machine


def one(run: str, size: int, out: str, threads: int, exact_sample: int, recall: float, budget_gib: float,
        index: str) -> None:
    """One size, in this process: evaluate_knn_lm with tqdm bars on stderr; the result to ``out``."""
    from tqdm import tqdm

    from knnformer.eval.knnlm import evaluate_knn_lm

    bars = []

    def factory(total, what=""):
        if bars:
            bars[-1].close()
        bars.append(tqdm(total=total, desc=f"[{size:,}] {what}", unit_scale=True, mininterval=5.0))
        return bars[-1].update

    load = os.getloadavg()
    t0 = time.perf_counter()
    r = evaluate_knn_lm(run, "valid", max_keys=size, threads=threads, progress_factory=factory,
                        exact_sample=exact_sample, recall_target=recall, memory_budget=int(budget_gib * (1 << 30)),
                        index=index)
    for bar in bars:
        bar.close()
    r["wall_seconds"] = round(time.perf_counter() - t0, 3)
    r["load_before"], r["load_after"] = load, os.getloadavg()
    r["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r["before"] = old_search_cost(run, size, r)
    Path(out).write_text(json.dumps(r, indent=2))


def old_search_cost(run: str, size: int, r: dict, queries: int = 1000) -> dict:
    """What the search before this issue would cost here: every valid query (tuning and scored) searched with
    k_max 256, nprobe 8 and refine 8 (2,048 candidates re-scored from the memory map), timed on ``queries``
    valid queries with the same index and scaled to all of them."""
    import numpy as np

    from knnformer.eval.knnlm import KnnStore, open_key_search

    knn = KnnStore.open(Path(run) / "knnlm").prefix(size)
    kind = r["index"]["kind"]
    if kind == "exact":
        return {}
    search, _ = open_key_search(knn, kind, nprobe=8, refine=8)
    n = r["half"] - 1 + r["tokens"]
    h = np.memmap(knn.path / "queries-valid" / "h.f32", dtype=np.float32, mode="r", shape=(n, knn.dim))
    rows = np.sort(np.random.default_rng(1).choice(n, queries, replace=False))
    q = np.asarray(h[rows])
    t0 = time.perf_counter()
    search.search(q, min(256, knn.num_keys))
    seconds = time.perf_counter() - t0
    return {"kind": kind, "k": 256, "nprobe": 8, "refine": 8 if kind == "ivfpq" else None, "timed_queries": queries,
            "seconds_per_query": seconds / queries, "estimated_search_seconds": round(seconds / queries * n, 1),
            "load": os.getloadavg()}


def summary(r: dict) -> dict:
    """The figures BENCHMARKS.md quotes."""
    c = r.get("sample_check") or {}
    return {"keys": r["store"]["keys"], "keys_reused": r["store"]["reused"], "seconds": r["seconds"],
            "wall_seconds": r["wall_seconds"], "peak_rss_gib": round(r["peak_rss_bytes"] / 2**30, 3),
            "load_before": r["load_before"], "load_after": r["load_after"],
            "index": {key: r["index"].get(key) for key in ("kind", "nlist", "nprobe", "refine", "recall_at_k",
                                                             "k_searched", "bytes", "rescored_from")},
            "lambda": r["lambda"], "k": r["k"], "temperature": r["temperature"],
            "lm_bits_per_byte": r["lm"]["bits_per_byte"], "knn_bits_per_byte": r["bits_per_byte"],
            "sample_check": c, "before": r.get("before")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--sizes", default="1000000,3000000,10000000")
    p.add_argument("--out", default="bench/results/knnlm-scale-gutenberg.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exact-sample", type=int, default=1000)
    p.add_argument("--recall", type=float, default=0.99)
    p.add_argument("--memory-budget", type=float, default=2.0, help="GiB")
    p.add_argument("--index", default="auto", choices=["auto", "exact", "ivf", "ivfpq"])
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--one-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        one(args.run, args.one, args.one_out, args.threads, args.exact_sample, args.recall, args.memory_budget,
            args.index)
        return
    out = Path(args.out)
    report = {"command": " ".join(sys.argv), "machine": machine(), "git": git_state(), "run": args.run,
              "sizes": {}}
    if out.is_file():  # sizes measured before are kept (a size is re-measured only when asked again)
        report["sizes"] = json.loads(out.read_text()).get("sizes", {})
    keys_total = 0.0
    for size in [int(x) for x in args.sizes.split(",")]:
        tmp = out.with_suffix(f".{size}.tmp")
        cmd = [sys.executable, "-m", "bench.knnlm_scale", args.run, "--one", str(size), "--one-out", str(tmp),
               "--threads", str(args.threads), "--exact-sample", str(args.exact_sample), "--recall",
               str(args.recall), "--memory-budget", str(args.memory_budget), "--index", args.index]
        print(" ".join(cmd), file=sys.stderr, flush=True)
        rc = subprocess.run(cmd, check=False).returncode
        if rc != 0:
            print(f"size {size:,} failed (exit {rc}); stopping", file=sys.stderr)
            break
        r = json.loads(tmp.read_text())
        tmp.unlink()
        s = summary(r)
        keys_total += 0.0 if r["store"]["reused"] else r["seconds"]["store"]
        built = json.loads((Path(args.run) / "knnlm" / "manifest.json").read_text())["num_keys"]
        # the store's build time covers the keys it holds; a smaller size is its prefix, at the same rate
        s["keys_seconds_total"] = round((r["store"].get("build_seconds") or keys_total) * min(1.0, size / built), 3)
        s["keys_seconds_prorated_from"] = built if built > size else None
        s["eval_seconds_with_keys_reused"] = round(r["seconds"]["total"] - r["seconds"]["store"], 3)
        report["sizes"][f"{size}/{args.index}"] = s
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps({size: s}, indent=1), flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
