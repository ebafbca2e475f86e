"""Issue 4 at corpus scale: the learned retriever with refreshes against frozen minilm, bm25 and dense, and
``past`` / two hops against their one-source, one-hop twins; one model per process, so several run side by side.

    python -m bench.joint_runs --corpus sympy --variant learned --steps 2000 --refresh 500-:500
    python -m bench.joint_runs --corpus sympy --variant minilm --steps 2680     # equal compute: see --summary
    python -m bench.joint_runs --corpus sympy --summary

Each run writes bench/results/joint/<datastore>-<variant>-<steps>.json: bits per byte on valid and test, RETRO's
overlap-filtered figure at alpha = 0.125, retrieval off, the per-neighbour gain, wall time, and for a learned run
each refresh's pause, recall and share of changed neighbour lists. ``--summary`` gathers them into
bench/results/joint-<datastore>.json. Datastores and frozen indexes are bench/retrieval.py's (same folder, same
names), so its finished indexes are reused. The preset is bench/retrieval.py's (nanoGPT's CPU shakespeare
setting), one torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import retrieval as rb

ROOT = Path(__file__).resolve().parents[1]

# variant -> (embedder store, overrides); "{refresh}" is --refresh
VARIANTS = {
    "dense": (None, []),
    "bm25": ("bm25", ["retrieval.enabled=true"]),
    "minilm": ("minilm", ["retrieval.enabled=true"]),
    "learned": ("minilm", ["retrieval.enabled=true", "retrieval.retriever.kind=learned", "retrieval.refresh.schedule={refresh}"]),
    "learned-emb": ("minilm", ["retrieval.enabled=true", "retrieval.retriever.kind=learned",
                               "retrieval.retriever.input=embedder", "retrieval.refresh.schedule={refresh}"]),
    "learned-emb-slow": ("minilm", ["retrieval.enabled=true", "retrieval.retriever.kind=learned",
                                    "retrieval.retriever.input=embedder", "retrieval.retriever.lr_scale=0.1",
                                    "retrieval.refresh.schedule={refresh}"]),
    "learned-emb-rerank": ("minilm", ["retrieval.enabled=true", "retrieval.retriever.kind=learned",
                                      "retrieval.retriever.input=embedder", "retrieval.refresh.mode=rerank",
                                      "retrieval.refresh.schedule={refresh}"]),
    "minilm-past": ("minilm", ["retrieval.enabled=true", "retrieval.search.sources=train,past"]),
    "bm25-past": ("bm25", ["retrieval.enabled=true", "retrieval.search.sources=train,past"]),
    "bm25-hops2": ("bm25-hops2", ["retrieval.enabled=true", "retrieval.search.hops=2"]),
}


def variant_store(base, name: str):
    """The datastore copy holding ``name``'s neighbours (``bm25-hops2``: bm25 with the second hop), indexed when
    missing."""
    from knnformer.data.chunks import read_retrieval_manifest
    from knnformer.data.datastore import Datastore
    from knnformer.retrieval.build import index_datastore

    store = rb.embedder_store(base, name)
    info = read_retrieval_manifest(store.path)
    if not info or "neighbours" not in info:
        embedder, hops = (name.removesuffix("-hops2"), 2) if name.endswith("-hops2") else (name, 1)
        print(f"indexing {store.path.name} ({embedder}, hops {hops})", flush=True)
        index_datastore(store.path, embedder=embedder, chunk_size=16, hops=hops)
    return Datastore.open(store.path)


def run_one(args) -> Path:
    emb, sets = VARIANTS[args.variant]
    base = rb.prepare(args.corpus, Path(args.work))
    tag = base.path.name.removesuffix("-store")
    store = variant_store(base, emb) if emb else base
    sets = [s.format(refresh=args.refresh) for s in sets]
    sets += [f"train.steps={args.steps}", f"train.checkpoint_interval={args.steps}", "train.threads=1"] + args.set
    run = Path(args.work) / f"joint-{tag}-{args.variant}-{args.steps}"
    t0 = time.perf_counter()
    result = rb.train_and_evaluate(store, run, args.preset, sets, rb.CORPORA[args.corpus]["splits"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    refresh_s = sum(r.get("refresh_seconds", 0) for r in rows)
    result.update({
        "variant": args.variant, "steps": args.steps, "datastore": store.path.name, "run": str(run),
        "refresh_seconds": round(refresh_s, 1),
        "refresh_share": round(refresh_s / result["train_seconds"], 3) if result["train_seconds"] else None,
        "refreshes": [{k: r.get(k) for k in ("step", "refresh", "refresh_started", "refresh_changed",
                                             "refresh_recall", "refresh_seconds", "refresh_cpu_seconds")}
                      for r in rows if "refresh" in r],
        "machine": rb.cpu_name(), "command": " ".join(sys.argv), "wall_seconds": round(time.perf_counter() - t0, 1)})
    out = ROOT / "bench" / "results" / "joint" / f"{tag}-{args.variant}-{args.steps}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}", flush=True)
    return out


def figures(r: dict, split: str) -> dict:
    s = r.get(split, {})
    return {"bits_per_byte": s.get("bits_per_byte"),
            "alpha_0.125": (s.get("filtered") or {}).get("0.125", {}).get("bits_per_byte"),
            "retrieval_off": (s.get("retrieval_off") or {}).get("bits_per_byte"),
            # the same weights without retrieval on the same low-overlap chunks: the retrieval gain at alpha 0.125
            "retrieval_off_alpha_0.125": ((s.get("retrieval_off") or {}).get("filtered") or {}).get("0.125", {}).get(
                "bits_per_byte")}


def compute_in_frozen_steps(r: dict, ratios: dict) -> float | None:
    """A learned run's training compute in steps of the frozen retrieval model: its steps times its step-time
    ratio to a frozen step (interleaved, bench/retro_step.py --learned), plus every refresh's CPU seconds (on a
    background thread or not) over the frozen step time implied by the run's own median step time."""
    key = {"learned": "learned retriever (layer 0) float32",
           "learned-emb": "learned retriever (embedder input) float32",
           "learned-emb-slow": "learned retriever (embedder input) float32",
           "learned-emb-rerank": "learned retriever (embedder input) float32"}.get(r["variant"])
    if key is None or key not in ratios:
        return None
    ratio = ratios[key]["retro_over_frozen"]
    frozen_step_s = 12 * 64 / r["tokens_per_s_median"] / ratio
    return r["steps"] * ratio + refresh_cpu(r) / frozen_step_s


def refresh_cpu(r: dict) -> float:
    """CPU seconds of a run's refreshes (read from its metrics; an in-line refresh without the figure counts its
    pause, which is its CPU time on one thread)."""
    metrics = Path(r["run"]) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else r["refreshes"]
    return sum(x.get("refresh_cpu_seconds") or x.get("refresh_seconds") or 0 for x in rows if "refresh" in x)


def summary(args) -> None:
    base = rb.prepare(args.corpus, Path(args.work))
    tag = base.path.name.removesuffix("-store")
    ratio_file = ROOT / "bench" / "results" / f"retro-step-{tag}-minilm-learned.json"
    ratios = json.loads(ratio_file.read_text())["results"] if ratio_file.exists() else {}
    frozen_over_dense = next((v["frozen_ratio"] for v in ratios.values() if "frozen_ratio" in v), None)
    rows = {}
    for path in sorted((ROOT / "bench" / "results" / "joint").glob(f"{tag}-*.json")):
        r = json.loads(path.read_text())
        frozen_steps = compute_in_frozen_steps(r, ratios)
        rows[f"{r['variant']} {r['steps']}"] = {
            "steps": r["steps"], "train_seconds": r["train_seconds"], "refresh_seconds": r["refresh_seconds"],
            "refresh_share": r["refresh_share"],
            "refresh_cpu_seconds": round(refresh_cpu(r), 1),
            **({"equal_compute_frozen_steps": round(frozen_steps),
                "equal_compute_dense_steps": round(frozen_steps * frozen_over_dense) if frozen_over_dense else None}
               if frozen_steps else {}),
            **{split: {**figures(r, split), "neighbour_gain_nats": (r[split].get("neighbour_gain") or {}).get(
                "mean_nats_per_token"), "second_hop": r[split].get("second_hop")}
               for split in rb.CORPORA[args.corpus]["splits"]}}
    out = ROOT / "bench" / "results" / f"joint-{tag}.json"
    out.write_text(json.dumps({"datastore": tag, "step_ratios": ratios, "runs": rows}, indent=2))
    for name, r in rows.items():
        print(f"{name:22s} " + "  ".join(
            f"{split} {r[split]['bits_per_byte']:.4f} (a.125 {r[split]['alpha_0.125'] or float('nan'):.4f}, off "
            f"{r[split]['retrieval_off'] or float('nan'):.4f})" for split in rb.CORPORA[args.corpus]["splits"])
            + f"  {r['train_seconds']:.0f} s, refresh pause {r['refresh_seconds']:.0f} s"
            + (f", = {r['equal_compute_frozen_steps']} frozen / {r['equal_compute_dense_steps']} dense steps"
               if "equal_compute_frozen_steps" in r else ""))
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", choices=["sympy", "gutenberg"], default="sympy")
    p.add_argument("--variant", choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--refresh", default="500-:500", help="the learned run's refresh schedule")
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--work", default=str(ROOT / "bench" / "work"))
    p.add_argument("--subset", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--set", action="append", default=[], help="extra config overrides")
    p.add_argument("--reuse", action="store_true", help="keep a finished run of the same steps")
    p.add_argument("--summary", action="store_true", help="gather the finished runs' JSON")
    p.add_argument("--data", default=rb.DEFAULT_DATA,
                   help="the folder holding the corpora (default: %(default)s, from the repository root)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    rb.REUSE, rb.SUBSET, rb.TOKENIZER = args.reuse, args.subset, ("bpe", args.vocab_size)
    rb.DATA = Path(args.data)
    if args.summary:
        summary(args)
    elif args.variant:
        run_one(args)
    else:
        p.error("give --variant or --summary")


if __name__ == "__main__":
    main()
