"""Exact kNN-LM search of a query sample over a real store: ``search.exact_l2`` (torch: one fp32 conversion of
each key block for all queries, one matrix product, top k merged) against faiss.knn over the same fp32 blocks (what
``exact_l2`` did before), in batches of 250 queries (how the evaluation searched its exact sample) and of all of
them; the same neighbours are checked. The exact sample is the reference every approximate setting is chosen
against, so its cost grows with the store: this is that cost.

    python -m bench.knnlm_exact bench/work/gut-small --keys 1000000 [--queries 1000] [--k 256]
        [--out bench/results/knnlm-exact.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.speed import git_state, machine


def faiss_knn(xb, xq, k, block=262_144):
    """The exact search before bench/knnlm_exact.py: faiss.knn per block of fp32 keys, results in a heap."""
    import faiss

    from knnformer.eval.knnlm.search import as_f32

    heap = faiss.ResultHeap(len(xq), k, keep_max=False)
    for b in range(0, len(xb), block):
        D, I = faiss.knn(xq, as_f32(xb[b : b + block]), k, metric=faiss.METRIC_L2)
        heap.add_result(D, np.where(I >= 0, I + b, -1))
    heap.finalize()
    return heap.D, heap.I


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--out", default="bench/results/knnlm-exact.json")
    args = p.parse_args()

    from knnformer.eval.knnlm import KnnStore
    from knnformer.eval.knnlm.search import exact_l2

    knn = KnnStore.open(Path(args.run) / "knnlm").prefix(args.keys)
    manifest = json.loads((knn.path / "queries-valid" / "manifest.json").read_text())
    h = np.memmap(knn.path / "queries-valid" / "h.f32", dtype=np.float32, mode="r", shape=(manifest["n"], knn.dim))
    q = np.ascontiguousarray(h[np.sort(np.random.default_rng(0).choice(manifest["done"], args.queries, False))])
    load_before = os.getloadavg()
    results, found = {}, {}
    for name, fn, batch in (("faiss_knn_batches_of_250", faiss_knn, 250), ("exact_l2_batches_of_250", exact_l2, 250),
                            ("exact_l2_all_at_once", exact_l2, len(q))):
        t0 = time.perf_counter()
        I = np.concatenate([fn(knn.keys, q[b : b + batch], args.k)[1] for b in range(0, len(q), batch)])
        results[name] = round(time.perf_counter() - t0, 3)
        found[name] = I
        print(name, results[name], file=sys.stderr, flush=True)
    ref = found["faiss_knn_batches_of_250"]
    same = {name: round(float(np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(I, ref)])), 5)
            for name, I in found.items()}
    report = {"command": " ".join(["python -m bench.knnlm_exact", *sys.argv[1:]]), "git": git_state(),
              "machine": machine(), "keys": knn.num_keys, "dim": knn.dim, "queries": len(q), "k": args.k,
              "seconds": results, "same_neighbours_as_faiss": same,
              "load_before": load_before, "load_after": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["seconds"]), json.dumps(same))


if __name__ == "__main__":
    main()
