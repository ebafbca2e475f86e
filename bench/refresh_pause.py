"""What a refresh costs training: the same learned run with refreshes in line (``refresh_lag=0``) and in the
background (``refresh_lag`` half the interval), one after the other in this process.

    python -m bench.refresh_pause --store bench/work/sympy-bpe4096-1of4-minilm-store --steps 600 --refresh 200-:200

Writes bench/results/refresh-pause-<store>.json: per mode the wall time, the pauses training waited for
(``refresh_seconds``), the refreshes' own CPU seconds (``refresh_cpu_seconds``) and the pause's share of the wall
time. Training runs on one torch thread; a background refresh can use a second core only if one is free, so
the figure depends on the machine's load (reported, with the core count).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True, help="a datastore with a dense embedder's neighbours")
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--refresh", default="200-:200")
    p.add_argument("--input", choices=["tokens", "embedder"], default="embedder", help="retrieval.retriever.input")
    p.add_argument("--lag", type=int, default=-1, help="the background mode's refresh_lag (-1: half the interval)")
    p.add_argument("--background-only", action="store_true", help="skip the in-line run (added to an earlier report)")
    p.add_argument("--work", default="/tmp/refresh-pause")
    args = p.parse_args()
    import shutil

    import torch

    from knnformer.config import load_config
    from knnformer.data.datastore import Datastore
    from knnformer.train.trainer import train

    torch.set_num_threads(1)
    store = Datastore.open(args.store)
    report = {"store": str(store.path), "steps": args.steps, "refresh": args.refresh, "input": args.input,
              "cores": os.cpu_count(), "load_before": os.getloadavg(), "command": " ".join(sys.argv), "modes": {}}
    out = ROOT / "bench" / "results" / f"refresh-pause-{store.path.name.removesuffix('-store')}-{args.input}.json"
    if args.background_only and out.exists():
        report["modes"] = json.loads(out.read_text())["modes"]
    modes = [("in line", 0)] if not args.background_only else []
    for mode, lag in modes + [(f"background, lag {args.lag}" if args.lag != -1 else "background", args.lag)]:
        run = Path(args.work) / mode.replace(" ", "-")
        shutil.rmtree(run, ignore_errors=True)
        config = load_config(args.preset, [
            "retrieval.enabled=true", "retrieval.retriever.kind=learned", f"retrieval.retriever.input={args.input}",
            f"retrieval.refresh.schedule={args.refresh}", f"retrieval.refresh.lag={lag}", f"train.steps={args.steps}",
            "train.eval_interval=0", f"train.checkpoint_interval={args.steps}", "train.threads=1"])
        config.model.vocab_size = store.tokenizer.vocab_size
        t0 = time.perf_counter()
        train(run, store, config)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        pause = sum(r.get("refresh_seconds", 0) for r in rows)
        cpu = sum(r.get("refresh_cpu_seconds", 0) for r in rows)
        report["modes"][mode] = {"wall_seconds": round(wall, 1), "pause_seconds": round(pause, 1),
                                 "refresh_cpu_seconds": round(cpu, 1), "pause_share": round(pause / wall, 3),
                                 "refreshes": sum("refresh" in r for r in rows), "load_after": os.getloadavg()}
        print(mode, report["modes"][mode], flush=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
