"""Dense vs retrieval (per embedder) vs dense + kNN-LM on one corpus, at equal steps and at equal wall-clock.

    python -m bench.retrieval --corpus shakespeare --embedders bytes-hash bm25 minilm --steps 2000

Writes bench/results/retrieval-<corpus>.json. Every model uses the same preset (model size, batch, steps);
retrieval models read neighbours precomputed by `knnformer index` (no search in the training loop). Bits per
byte on valid (and test where the corpus has one), with RETRO's overlap-filtered figure at alpha = 0.125
beside it; step time of each retrieval model over the dense step time, measured in this process; index
build time and bytes per chunk; retrieval latency per generated chunk.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data"  # from the repository root: --data
# inputs and split files are relative to the data folder (DATA)
CORPORA = {
    "shakespeare": {"inputs": ["tinyshakespeare/input.txt"], "split_file": None, "splits": ["valid"]},
    "sympy": {"inputs": ["sympy-1.13.3"], "split_file": None, "splits": ["valid", "test"], "glob": "**/*.py.txt"},
    "gutenberg": {"inputs": ["gutenberg/books"], "split_file": "gutenberg/MANIFEST.tsv", "splits": ["valid", "test"]},
}


DATA = Path(DEFAULT_DATA)
REUSE = False
TOKENIZER = ("bytes", 0)
SUBSET = 1


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor()


def prepare(corpus: str, work: Path):
    """The corpus's datastore in ``work`` (reused when there), read from the DATA folder. With SUBSET = N > 1
    only the documents whose id hashes to 0 mod N are kept (a reproducible 1/N of the corpus, for embedders too
    slow for all of it); with a published split, all of valid and test are kept and 1/N of train."""
    import hashlib

    from knnformer.data.corpus import apply_split_file, assign_splits, read_documents, read_split_file
    from knnformer.data.datastore import Datastore, build_tokenizer, write_datastore

    spec = CORPORA[corpus]
    kind, vocab = TOKENIZER
    path = work / f"{corpus}-store" if (kind, SUBSET) == ("bytes", 1) else work / f"{corpus}-{kind}{vocab}-1of{SUBSET}-store"
    if not (path / "manifest.json").exists():
        inputs = [str((DATA / p).resolve()) for p in spec["inputs"]]
        docs, _ = read_documents(inputs, spec.get("glob", "**/*"))
        keep = lambda d: int(hashlib.sha256(d.doc_id.encode()).hexdigest(), 16) % SUBSET == 0  # noqa: E731
        if spec["split_file"]:  # a published split: keep all of valid and test, 1/N of train
            docs = apply_split_file(docs, read_split_file(str((DATA / spec["split_file"]).resolve())))
            docs = [d for d in docs if d.split != "train" or keep(d)]
        else:
            docs = [d for d in docs if keep(d)]
            single = len(docs) == 1
            docs = assign_splits(docs, 0.1 if single else 0.05, 0.0 if single else 0.05)
        write_datastore(path, docs, build_tokenizer(docs, kind, vocab), inputs, True)
    return Datastore.open(path)


def median_rate(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if "valid_loss" not in r)


GAIN_WINDOWS = 64  # windows evaluate measures each served neighbour's gain on


def evaluate_splits(run: Path, splits: list[str]) -> dict:
    from knnformer.eval.evaluate import evaluate_run

    out = {}
    for split in splits:
        result = evaluate_run(run, split, gain_windows=GAIN_WINDOWS)
        out[split] = {k: result[k] for k in ("loss", "bits_per_byte", "filtered", "retrieval_off", "retrieval",
                                             "neighbours", "neighbour_gain", "refreshes", "second_hop") if k in result}
    return out


def train_and_evaluate(store, run: Path, preset: str, sets: list[str], splits: list[str]) -> dict:
    from knnformer.config import load_config
    from knnformer.train.trainer import train

    config = load_config(preset, sets)
    config.model.vocab_size = store.tokenizer.vocab_size
    timing = run / "bench-seconds.json"
    if REUSE and (run / "checkpoints" / f"step-{config.train.steps:07d}").is_dir():
        # a finished run of the same steps: keep it (its wall time from this script, else from its median rate)
        seconds = (json.loads(timing.read_text())["seconds"] if timing.exists() else
                   config.train.steps * config.train.batch_size * config.model.context / median_rate(run))
    else:
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        train(run, store, config)
        seconds = time.perf_counter() - t0
        timing.write_text(json.dumps({"seconds": seconds}))
    out = {"train_seconds": round(seconds, 1), "tokens_per_s_median": round(median_rate(run), 1), "sets": sets}
    out.update(evaluate_splits(run, splits))
    return out


def retrieval_latency(store, run: Path, chunks: int = 20) -> float:
    """Median milliseconds of one retrieval (embed + search) per generated chunk."""
    from knnformer.retrieval.live import open_retriever
    from knnformer.run.record import load_run
    from knnformer.serve.generate import RetrievingGenerator

    model, record, _ = load_run(run)
    gen = RetrievingGenerator(model, open_retriever(store), 2)
    C = gen.C
    prompt = [int(t) for t in store.split_tokens("valid")[:C]]
    list(gen.sample(prompt, C * chunks, temperature=1.0, seed=0))
    lat = sorted(gen.latencies_ms)
    return round(lat[len(lat) // 2], 3)


def embedder_store(store, embedder: str):
    """A copy of the datastore (hard links to its token files) holding one embedder's index, so embedders do
    not overwrite each other's neighbours and a finished index is reused by a later run of this script."""
    import os

    from knnformer.data.datastore import Datastore

    path = store.path.parent / f"{store.path.name.removesuffix('-store')}-{embedder}-store"
    if not (path / "manifest.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        for name in ("tokens.bin", "docs.npy", "docs.json", "tokenizer.json"):
            if not (path / name).exists():
                os.link(store.path / name, path / name)
        manifest = json.loads((store.path / "manifest.json").read_text())
        manifest.pop("retrieval", None)
        (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return Datastore.open(path)


def evaluate_dense_filtered(run: Path, store, split: str) -> dict:
    """The dense run scored on ``store``'s chunks, bucketed by that store's neighbours."""
    from knnformer.eval.evaluate import evaluate_run

    r = evaluate_run(run, split, datastore=str(store.path))
    return {"bits_per_byte": r["bits_per_byte"], "filtered": r.get("filtered")}


def knn_lm(run: Path, splits: list[str]) -> dict:
    from knnformer.eval.knnlm import evaluate_knn_lm

    out = {}
    for split in splits:
        r = evaluate_knn_lm(run, split, threads=1)
        out[split] = {"bits_per_byte": r["bits_per_byte"], "loss": r["loss"], "lm_bits_per_byte": r["lm"]["bits_per_byte"],
                      "lm_loss": r["lm"]["loss"], "scored": r["scored"], "tuned_on": r["tuned_on"], "lambda": r["lambda"],
                      "k": r["k"], "temperature": r["temperature"], "seconds": r["seconds"],
                      "filtered": r.get("filtered"), "lm_filtered": r["lm"].get("filtered")}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", choices=sorted(CORPORA), default="shakespeare")
    p.add_argument("--embedders", nargs="+", default=["bytes-hash", "bm25"])
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--work", default=str(ROOT / "bench" / "work"))
    p.add_argument("--equal-time", action="store_true", help="also train dense for the retrieval run's wall time")
    p.add_argument("--step-ratio", type=float, default=0.0,
                   help="RETRO step time over dense step time for --equal-time, as bench/retro_step.py measures it "
                        "by interleaving (0: the ratio of this script's two training wall times, which load on a "
                        "shared machine skews when the runs are minutes or sessions apart)")
    p.add_argument("--knn-lm", action="store_true", help="also evaluate dense + kNN-LM")
    p.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    p.add_argument("--reuse", action="store_true", help="keep finished runs of the same steps in --work")
    p.add_argument("--tokenizer", choices=["bytes", "bpe"], default="bytes")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--subset", type=int, default=1, help="keep 1 in N documents (by a hash of the id)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="the folder holding the corpora (default: %(default)s, from the repository root)")
    args = p.parse_args()
    global DATA, REUSE, TOKENIZER, SUBSET
    DATA, REUSE, SUBSET = Path(args.data), args.reuse, args.subset
    TOKENIZER = (args.tokenizer, args.vocab_size if args.tokenizer == "bpe" else 0)
    from knnformer.data.chunks import read_retrieval_manifest
    from knnformer.retrieval.build import index_datastore

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = CORPORA[args.corpus]
    base_store = prepare(args.corpus, work)
    tag = base_store.path.name.removesuffix("-store")
    base = [f"train.steps={args.steps}", f"train.checkpoint_interval={args.steps}"] + args.set
    out = ROOT / "bench" / "results" / f"retrieval-{tag}.json"
    report = {"corpus": args.corpus, "datastore": tag, "tokenizer": list(TOKENIZER), "subset": f"1/{SUBSET}",
              "train_tokens": int(len(base_store.split_tokens("train"))), "preset": args.preset, "steps": args.steps,
              "chunk_size": args.chunk_size, "machine": cpu_name(), "command": " ".join(sys.argv), "models": {}}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))

    print(f"dense ({args.steps} steps)", flush=True)
    dense_run = work / f"{tag}-dense"
    dense = train_and_evaluate(base_store, dense_run, args.preset, base, spec["splits"])
    report["models"]["dense"] = dense
    if args.knn_lm:
        print("dense + kNN-LM", flush=True)
        report["models"]["dense+knn-lm"] = knn_lm(dense_run, spec["splits"])
    save()
    equal_time_done: dict[int, dict] = {}
    for embedder in args.embedders:
        store = embedder_store(base_store, embedder)
        print(f"index with {embedder}", flush=True)
        t0 = time.perf_counter()
        info = read_retrieval_manifest(store.path)
        done = info.get("neighbours", {})
        if not (REUSE and done.get("embedder") == embedder and done.get("chunk_size") == args.chunk_size):
            index_datastore(store.path, embedder=embedder, chunk_size=args.chunk_size)
            info = read_retrieval_manifest(store.path)
        index_seconds = time.perf_counter() - t0
        print(f"retrieval with {embedder}", flush=True)
        run = work / f"{tag}-retro-{embedder}"
        result = train_and_evaluate(store, run, args.preset, base + ["retrieval.enabled=true"], spec["splits"])
        result["step_time_vs_dense"] = round(dense["tokens_per_s_median"] / result["tokens_per_s_median"], 3)
        result["index"] = {"seconds_this_run": round(index_seconds, 1), **info["index"],
                           "embedding_seconds": info.get("embeddings", {}).get("seconds"),
                           "neighbour_seconds": info["neighbours"]["seconds"]}
        result["retrieval_ms_per_chunk"] = retrieval_latency(store, run)
        report["models"][f"retro-{embedder}"] = result
        # the dense model on the chunks bucketed by this embedder's neighbours (RETRO reports both on the same)
        report["models"][f"dense-filtered-by-{embedder}"] = {
            split: evaluate_dense_filtered(dense_run, store, split) for split in spec["splits"]}
        save()
        if args.equal_time:
            ratio = args.step_ratio or result["train_seconds"] / dense["train_seconds"]
            steps = round(args.steps * ratio)
            if steps not in equal_time_done:
                print(f"dense at equal wall-clock ({steps} steps)", flush=True)
                equal_time_done[steps] = train_and_evaluate(
                    base_store, work / f"{tag}-dense-{steps}steps", args.preset,
                    [f"train.steps={steps}", f"train.checkpoint_interval={steps}"] + args.set, spec["splits"])
            report["models"][f"dense-equal-time-{embedder}"] = {"steps": steps, "step_ratio": round(ratio, 3),
                                                                 "step_ratio_from": "--step-ratio" if args.step_ratio
                                                                 else "training wall times", **equal_time_done[steps]}
            save()
    save()
    summary = {name: {s: (m[s]["bits_per_byte"], m[s].get("filtered", {}).get("0.125", {}).get("bits_per_byte"))
                      for s in spec["splits"] if s in m} for name, m in report["models"].items()}
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
