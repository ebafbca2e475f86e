"""Issue 13: which RETRO setting should be the default. Dense against RETRO with K neighbours x encoder width, on
one datastore (bm25 neighbours), at equal steps: valid bits per byte with the overlap-filtered (alpha 0.125)
figure, per seed, and each setting's training step time over dense's, measured by interleaving their steps in
one process (``bench/retro_step.py``'s ``measure``).

    python -m bench.retro_defaults --source bench/work/retrieval-db/sympy-eval --steps 1000 --seeds 1337 1338

``--source``: a prepared datastore (here the sympy BPE-4096 one ``python -m bench.retrieval_db prepare sympy``
writes: a sixteenth of the train files, a quarter of the held-out ones). Its token files are hard-linked into
``--work`` and indexed there with bm25 (chunks of 16), so the source is never modified. Writes
bench/results/retro-defaults-<name>.json after every finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {  # name -> overrides; "{half}" / "{quarter}" are model.dim // 2 and // 4
    "K=2, encoder D/2": ["retrieval.num_neighbours=2", "retrieval.encoder_dim={half}"],
    "K=2, encoder D/4": ["retrieval.num_neighbours=2", "retrieval.encoder_dim={quarter}"],
    "K=1, encoder D/2": ["retrieval.num_neighbours=1", "retrieval.encoder_dim={half}"],
    "K=1, encoder D/4": ["retrieval.num_neighbours=1", "retrieval.encoder_dim={quarter}"],
}


def linked_store(source: Path, work: Path, chunk_size: int):
    """``source``'s token files hard-linked into ``work``, indexed there with bm25 (once)."""
    from knnformer.data.chunks import read_retrieval_manifest
    from knnformer.data.datastore import Datastore
    from knnformer.retrieval.build import index_datastore

    path = work / f"{source.name}-bm25-store"
    if not (path / "manifest.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        for name in ("tokens.bin", "docs.npy", "docs.json", "tokenizer.json"):
            if not (path / name).exists():
                os.link(source / name, path / name)
        manifest = json.loads((source / "manifest.json").read_text())
        manifest.pop("retrieval", None)
        (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if read_retrieval_manifest(path).get("neighbours", {}).get("chunk_size") != chunk_size:
        index_datastore(path, embedder="bm25", chunk_size=chunk_size)
    return Datastore.open(path)


def train_one(store_path: str, run: str, preset: str, sets: list[str]) -> dict:
    """Train one model (reused when its final checkpoint is there) and score valid (filtered figures included)."""
    import torch

    torch.set_num_threads(1)
    import bench.retrieval as br
    from knnformer.data.datastore import Datastore

    br.REUSE = True
    return br.train_and_evaluate(Datastore.open(store_path), Path(run), preset, sets, ["valid"])


def summary(model: dict) -> tuple[float, float | None, float | None]:
    v = model["valid"]
    f = (v.get("filtered") or {}).get("0.125") or {}
    return v["bits_per_byte"], f.get("bits_per_byte"), f.get("fraction")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", required=True, help="a prepared datastore (token files are hard-linked, not changed)")
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--step-time-steps", type=int, default=40, help="interleaved steps per setting (0: skip)")
    p.add_argument("--jobs", type=int, default=2, help="trainings run at once (one torch thread each)")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--work", default=str(ROOT / "bench" / "work" / "retro-defaults"))
    p.add_argument("--out", default="", help="results file (default bench/results/retro-defaults-<source>.json); "
                   "the step times already in it are kept (as step_time_earlier when measured again)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from bench.retrieval import cpu_name
    from bench.retro_step import measure
    from knnformer.config import load_config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = Path(args.source).resolve()
    t0 = time.perf_counter()
    store = linked_store(source, work, args.chunk_size)
    dim = load_config(args.preset).model.dim
    sets_of = {n: [s.format(half=dim // 2, quarter=dim // 4) for s in VARIANTS[n]] for n in args.variants}
    flags = next((ln.split(":", 1)[1].split() for ln in os.popen("lscpu").read().splitlines()
                  if ln.startswith("Flags")), [])
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"retro-defaults-{source.name}.json"
    before = json.loads(out.read_text()) if out.exists() else {}
    kept = before.get("step_time", {}) if not args.step_time_steps else {}
    # earlier interleaved measurements of the same settings stay in the file beside the new one
    earlier = before.get("step_time_earlier", []) + ([before["step_time"]] if before.get("step_time") and
                                                      args.step_time_steps else [])
    report = {"source": str(source), "store": str(store.path), "preset": args.preset, "steps": args.steps,
              "seeds": args.seeds, "chunk_size": args.chunk_size, "embedder": "bm25",
              "train_tokens": int(len(store.split_tokens("train"))),
              "valid_tokens": int(len(store.split_tokens("valid"))),
              "machine": cpu_name(), "cpu_flags": [f for f in flags if f.startswith(("avx", "amx"))],
              "cpus": os.cpu_count(), "command": " ".join(sys.argv), "load_before": os.getloadavg(),
              "index_seconds": round(time.perf_counter() - t0, 1), "step_time": kept, "step_time_earlier": earlier,
              "models": {}}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))

    if args.step_time_steps:
        for name, sets in sets_of.items():
            load = os.getloadavg()
            r = measure(store, args.preset, sets, "float32", args.step_time_steps, 5)
            report["step_time"][name] = {"sets": sets, "load_before": load, "load_after": os.getloadavg(), **r}
            print(f"step time {name:18s} x{r['ratio']:.2f} (pairs x{r['median_pair_ratio']:.2f}; dense "
                  f"{r['dense_ms']:.1f} ms, retro {r['retro_ms']:.1f} ms)", flush=True)
            save()
    base = [f"train.steps={args.steps}", f"train.checkpoint_interval={args.steps}", "train.threads=1",
            f"train.eval_interval={args.steps}"]
    jobs = []
    for seed in args.seeds:
        jobs.append((f"dense seed {seed}", work / f"dense-s{seed}", base + [f"train.seed={seed}"]))
        for name, sets in sets_of.items():
            tag = name.replace("=", "").replace(", encoder ", "-").replace("/", "")
            jobs.append((f"{name} seed {seed}", work / f"retro-{tag}-s{seed}",
                         base + [f"train.seed={seed}", "retrieval.enabled=true"] + sets))
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {name: pool.submit(train_one, str(store.path), str(run), args.preset, sets)
                   for name, run, sets in jobs}
        for name, fut in futures.items():
            report["models"][name] = fut.result()
            bpb, filt, share = summary(report["models"][name])
            print(f"{name:28s} valid {bpb:.4f} bits/byte, alpha 0.125 {filt} ({share})", flush=True)
            report["load_after"] = os.getloadavg()
            save()
    # means over seeds, beside the step-time ratio
    table = {}
    for name in ["dense"] + list(sets_of):
        rows = [summary(report["models"][f"{name} seed {s}"]) for s in args.seeds]
        table[name] = {"valid_bpb_mean": round(statistics.mean(r[0] for r in rows), 4),
                       "valid_bpb_per_seed": [r[0] for r in rows],
                       "alpha_0.125_mean": (round(statistics.mean(r[1] for r in rows), 4)
                                            if all(r[1] is not None for r in rows) else None),
                       "alpha_0.125_per_seed": [r[1] for r in rows],
                       "step_ratio_vs_dense": report["step_time"].get(name, {}).get("ratio", 1.0 if name == "dense"
                                                                                     else None)}
    report["table"] = table
    report["load_after"] = os.getloadavg()
    save()
    print(json.dumps(table, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
