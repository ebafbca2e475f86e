"""Which faiss index searches kNN-LM's keys fastest at a recall: on a real store (a run's ``knnlm/`` and its
valid queries), each variant is built over the first N keys, then timed on a sample of valid queries at several
nprobe (and, for the compressed ones, refine: refine x k candidates re-scored exactly from the fp16 keys), with
its recall@k against exact search. What the measurement decides: the store's index kinds and their sizes.

Variants (``NAME[:per_root[:points]]``, nlist = per_root x sqrt(N), default 2 as ``search.build_ivf`` did, and
k-means trained on ``points`` (default 40) keys a list):
``ivf`` fp16 codes of the keys (the store's ``ivf``); ``ivfh`` the same, its k-means assigning through an HNSW
graph of the centroids (affordable with many lists); ``sq8`` 8-bit scalar codes; ``pq8`` IVF-PQ, D/4 bytes (the
store's ``ivfpq``); ``fsM`` IVF-PQ fast-scan, M 4-bit codes; ``pcaR`` a PCA to R dims before an fp16 IVF.

    python -m bench.knnlm_indexes bench/work/gut-small --keys 3000000 --variants ivf,ivfh:8,ivfh:8:16,pq8,fs96,pca128 \\
        [--queries 500] [--out bench/results/knnlm-indexes.json]
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

FLAT = ("ivf", "ivfh")


def build(kind: str, per_root: int, knn, rng, per_list: int = 40) -> tuple[object, dict]:
    import faiss

    from knnformer.eval.knnlm.search import as_f32

    n, d = knn.num_keys, knn.dim
    nlist = min(65_536, per_root * int(np.sqrt(n)))
    hnsw = nlist >= 2048
    dim = int(kind[3:]) if kind.startswith("pca") else d
    quant = faiss.IndexHNSWFlat(dim, 32) if hnsw else faiss.IndexFlatL2(dim)
    if kind in FLAT or kind.startswith("pca"):
        index = faiss.IndexIVFScalarQuantizer(quant, dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2,
                                              False)
    elif kind == "sq8":
        index = faiss.IndexIVFScalarQuantizer(quant, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2, False)
    elif kind == "pq8":
        index = faiss.IndexIVFPQ(quant, d, nlist, d // 4, 8, faiss.METRIC_L2)
    elif kind.startswith("fs"):
        index = faiss.IndexIVFPQFastScan(quant, d, nlist, int(kind[2:]), 4, faiss.METRIC_L2)
    else:
        raise ValueError(f"unknown variant {kind!r}")
    ivf = index
    if kind.startswith("pca"):
        index = faiss.IndexPreTransform(faiss.PCAMatrix(d, dim), ivf)
    ivf.cp.niter = 10
    if hnsw:
        if kind == "ivfh":
            ci = faiss.IndexHNSWFlat(dim, 32)
            ci.hnsw.efSearch, ci.hnsw.efConstruction = 64, 40
            ivf.clustering_index = ci
        else:
            ivf.clustering_index = faiss.IndexFlatL2(dim)
        quant.hnsw.efConstruction = 40
    t0 = time.perf_counter()
    index.train(as_f32(knn.keys[np.sort(rng.choice(n, min(n, per_list * nlist), replace=False))]))
    train = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in range(0, n, 131_072):
        index.add(as_f32(knn.keys[b : b + 131_072]))
    return index, {"nlist": nlist, "training_points_per_list": per_list, "train_seconds": round(train, 2), "add_seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--keys", type=int, default=3_000_000)
    p.add_argument("--variants", default="ivf,ivfh:8,sq8,pq8,fs96,pca128")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--ks", default="256,64")
    p.add_argument("--out", default="bench/results/knnlm-indexes.json")
    args = p.parse_args()

    import faiss

    from knnformer.eval.knnlm import KnnStore
    from knnformer.eval.knnlm.search import _recall_of, exact_l2, rescore_l2

    knn = KnnStore.open(Path(args.run) / "knnlm").prefix(args.keys)
    manifest = json.loads((knn.path / "queries-valid" / "manifest.json").read_text())
    h = np.memmap(knn.path / "queries-valid" / "h.f32", dtype=np.float32, mode="r", shape=(manifest["n"], knn.dim))
    rng = np.random.default_rng(0)
    q = np.ascontiguousarray(h[np.sort(rng.choice(manifest["done"], args.queries, replace=False))])
    ks = [int(k) for k in args.ks.split(",")]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    exact = exact_l2(knn.keys, q, max(ks))[1]
    report = {"command": " ".join(["python -m bench.knnlm_indexes", *sys.argv[1:]]), "git": git_state(),
              "machine": machine(), "faiss": faiss.__version__, "keys": knn.num_keys, "dim": knn.dim,
              "queries": len(q), "exact_seconds": round(time.perf_counter() - t0, 2), "variants": {}}
    for v in args.variants.split(","):
        kind, *sizes = v.split(":")
        per_root = int(sizes[0]) if sizes else 2
        index, info = build(kind, per_root, knn, rng, int(sizes[1]) if len(sizes) > 1 else 40)
        print(v, info, file=sys.stderr, flush=True)
        ivf = faiss.extract_index_ivf(index)
        hnsw = getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None)
        rows = []
        for k in ks:
            for nprobe in ((32, 64, 128, 256) if per_root > 2 else (8, 16, 32, 64)):
                ivf.nprobe = nprobe
                if hnsw is not None:
                    hnsw.efSearch = max(2 * nprobe, 32)
                for refine in ((1,) if kind in FLAT else (1, 2, 4, 8)):
                    t0 = time.perf_counter()
                    D, I = index.search(q, k * refine)
                    t1 = time.perf_counter()
                    if kind not in FLAT:
                        D, I = rescore_l2(knn.keys, q, I, k)
                    t2 = time.perf_counter()
                    rows.append({"k": k, "nprobe": nprobe, "refine": refine,
                                 "recall": round(_recall_of(I[:, :k], exact[:, :k]), 4),
                                 "scan_ms_per_query": round(1000 * (t1 - t0) / len(q), 4),
                                 "rescore_ms_per_query": round(1000 * (t2 - t1) / len(q), 4),
                                 "ms_per_query": round(1000 * (t2 - t0) / len(q), 4)})
                    print(v, rows[-1], file=sys.stderr, flush=True)
        for target in (0.95, 0.99):  # the fastest setting of each k reaching the recall target
            for k in ks:
                ok = [r for r in rows if r["k"] == k and r["recall"] >= target]
                info[f"fastest_k{k}_recall{target}"] = min(ok, key=lambda r: r["ms_per_query"]) if ok else None
        report["variants"][v] = {**info, "rows": rows}
        del index
    report["load_before"], report["load_after"] = load_before, os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
