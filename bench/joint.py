"""Joint optimization on a small corpus: frozen bytes-hash neighbours vs a learned retriever with refreshes, with
and without ``past``, at equal steps (wall time, refresh pauses included, reported beside each).

    python -m bench.joint --chars 250000 --steps 200 --work /tmp/joint-bench

Writes bench/results/joint-shakespeare.json. One thread, a small model: a smoke-scale measurement, not the
issue's sympy/gutenberg comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "dense": ["retrieval.enabled=false"],
    "frozen bytes-hash": ["retrieval.enabled=true"],
    "learned + refresh": ["retrieval.enabled=true", "retrieval.retriever.kind=learned", "retrieval.refresh.schedule={refresh}"],
    "learned + refresh + past": ["retrieval.enabled=true", "retrieval.retriever.kind=learned",
                                 "retrieval.refresh.schedule={refresh}", "retrieval.search.sources=train,past"],
}


def main() -> None:
    import torch

    from knnformer.config import load_config
    from knnformer.data.corpus import assign_splits, read_documents
    from knnformer.data.datastore import Datastore, build_tokenizer, write_datastore
    from knnformer.eval.evaluate import evaluate_run
    from knnformer.retrieval.build import index_datastore
    from knnformer.train.trainer import train

    p = argparse.ArgumentParser()
    p.add_argument("--chars", type=int, default=250_000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--refresh", default="50-:50")
    p.add_argument("--work", default="/tmp/joint-bench")
    p.add_argument("--data", type=Path, default=Path("../shared/data/tinyshakespeare/input.txt"),
                   help="tiny shakespeare, cut to --chars (default: %(default)s, from the repository root)")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = args.data.read_text()[: args.chars]
    (work / "input.txt").write_text(text)
    store_path = work / "store"
    if not (store_path / "manifest.json").exists():
        docs, _ = read_documents([str(work / "input.txt")])
        docs = assign_splits(docs, 0.1, 0.0)
        write_datastore(store_path, docs, build_tokenizer(docs, "bytes", 256), [str(work / "input.txt")])
    t0 = time.perf_counter()
    index_datastore(store_path, embedder="bytes-hash", index="flat", k=4, chunk_size=16, exclude_window=128)
    index_s = time.perf_counter() - t0
    store = Datastore.open(store_path)
    common = ["model.context=64", "model.num_layers=4", "model.num_heads=4", "model.dim=128",
              f"train.steps={args.steps}", "train.batch_size=16", "train.eval_interval=0", "train.threads=1",
              f"train.checkpoint_interval={args.steps}", "train.warmup_steps=20", "retrieval.num_neighbours=2"]
    results = {"corpus": f"tinyshakespeare, first {args.chars} characters (one document, split by position)",
               "steps": args.steps, "refresh": args.refresh, "index_seconds_bytes_hash": round(index_s, 2),
               "runs": {}}
    for name, overrides in VARIANTS.items():
        run = work / name.replace(" ", "_").replace("+", "")
        config = load_config("tiny", common + [o.format(refresh=args.refresh) for o in overrides])
        config.model.vocab_size = 256
        t0 = time.perf_counter()
        train(run, store, config)
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        refresh_s = sum(r.get("refresh_seconds", 0) for r in rows)
        ev = evaluate_run(run, "valid")
        results["runs"][name] = {
            "valid_bpb": round(ev["bits_per_byte"], 4),
            "valid_bpb_retrieval_off": round(ev.get("retrieval_off", {}).get("bits_per_byte", float("nan")), 4),
            "valid_bpb_alpha_0.125": round(ev.get("filtered", {}).get("0.125", {}).get("bits_per_byte", float("nan")), 4),
            "train_seconds": round(seconds, 1), "refresh_seconds": round(refresh_s, 1),
            "refresh_share": round(refresh_s / seconds, 3),
            "refreshes": [{k: r[k] for k in ("step", "refresh", "refresh_changed", "refresh_recall", "refresh_seconds")}
                          for r in rows if "refresh" in r]}
        print(name, json.dumps(results["runs"][name]), flush=True)
    out = ROOT / "bench" / "results" / "joint-shakespeare.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
