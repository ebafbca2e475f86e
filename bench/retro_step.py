"""Training step time of a RETRO model over the dense model's, measured by interleaving their steps in one
process (dense, retro, dense, retro, ...) so that load on a shared machine hits both alike.

    python -m bench.retro_step --store bench/work/shakespeare-bm25-store --preset shakespeare-char

Writes bench/results/retro-step-<store>.json: per variant and dtype the median step times (ms), the ratio of
the medians and the median of per-pair ratios. Steps include sampling the batch and its neighbours (read from
the datastore's precomputed neighbours.npy; no search), forward, backward and the optimizer step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "default (K=2, encoder D/2)": [],
    "K=1, encoder D/4": ["retrieval.num_neighbours=1", "retrieval.encoder_dim={quarter}"],
    "K=2, encoder D/4": ["retrieval.encoder_dim={quarter}"],
}
LEARNED = {  # issue 4: the learned retriever (decoder block 0 + projection on every query and neighbour chunk)
    "learned retriever (layer 0)": ["retrieval.retriever.kind=learned"],
    "learned retriever (embedder input)": ["retrieval.retriever.kind=learned", "retrieval.retriever.input=embedder"],
}


def measure(store, preset: str, sets: list[str], dtype: str, steps: int, warmup: int,
            frozen: bool = False) -> dict:
    """Median step times of dense and the retrieval model ``sets`` (and, with ``frozen``, the default frozen
    retrieval model too), their steps interleaved."""
    from knnformer.config import load_config
    from knnformer.model.transformer import Transformer
    from knnformer.run.batches import WindowSampler
    from knnformer.run.vectors import frozen_vectors
    from knnformer.runtime import autocast
    from knnformer.train.inputs import resolve_retrieval
    from knnformer.train.optim import make_optimizer

    def setup(retrieval: bool, extra: list[str]):
        cfg = load_config(preset, [f"train.dtype={dtype}"] + (["retrieval.enabled=true"] + extra if retrieval else []))
        cfg.model.vocab_size = store.tokenizer.vocab_size
        nb, derived = resolve_retrieval(cfg, store)
        cfg.retrieval = derived.apply(cfg.retrieval)
        frozen = frozen_vectors(store, cfg.retrieval) if retrieval else None
        width = frozen.shape[1] if frozen is not None else 0
        model = Transformer(cfg.model, cfg.retrieval if retrieval else None, width)
        sampler = WindowSampler(store.split_tokens("train"), cfg.model.context, nb, "train",
                                cfg.retrieval.num_neighbours, cfg.retrieval.continuation, vectors=frozen)
        return model, make_optimizer(model, cfg.train), sampler, cfg.train.batch_size

    g = torch.Generator().manual_seed(0)
    runs = [setup(False, []), setup(True, sets)] + ([setup(True, [])] if frozen else [])
    times: list[list[float]] = [[] for _ in runs]
    for i in range(warmup + steps):
        for j, (model, opt, sampler, batch) in enumerate(runs):
            t0 = time.perf_counter()
            b = sampler.sample(batch, g)
            with autocast(dtype, torch.device("cpu")):
                _, loss = model(b.x, b.y, **(b.model_inputs() if j else {}))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                times[j].append(time.perf_counter() - t0)
    dense, retro = statistics.median(times[0]), statistics.median(times[1])
    return {"dense_ms": round(dense * 1e3, 2), "retro_ms": round(retro * 1e3, 2), "ratio": round(retro / dense, 3),
            "median_pair_ratio": round(statistics.median(r / d for d, r in zip(times[0], times[1])), 3),
            "retro_params": sum(p.numel() for p in runs[1][0].parameters()),
            "dense_params": sum(p.numel() for p in runs[0][0].parameters()),
            **({"frozen_ms": round(statistics.median(times[2]) * 1e3, 2),
                "frozen_ratio": round(statistics.median(times[2]) / dense, 3),
                "retro_over_frozen": round(retro / statistics.median(times[2]), 3)} if frozen else {})}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True, help="a datastore with neighbours (knnformer index)")
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--learned", action="store_true",
                   help="measure the learned retriever against dense and the frozen retrieval model instead")
    p.add_argument("--set", action="append", default=[], help="extra overrides for the retrieval models")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from bench.retrieval import cpu_name
    from knnformer.config import load_config
    from knnformer.data.datastore import Datastore

    store = Datastore.open(args.store)
    quarter = load_config(args.preset).model.dim // 4
    report = {"store": str(store.path), "preset": args.preset, "threads": args.threads, "machine": cpu_name(),
              "command": " ".join(sys.argv), "results": {}}
    for name, sets in (LEARNED if args.learned else VARIANTS).items():
        sets = [s.format(quarter=quarter) for s in sets] + args.set
        for dtype in args.dtypes:
            r = measure(store, args.preset, sets, dtype, args.steps, args.warmup, args.learned)
            report["results"][f"{name} {dtype}"] = {"sets": sets, **r}
            print(f"{name:28s} {dtype:9s} dense {r['dense_ms']:7.1f} ms  retro {r['retro_ms']:7.1f} ms  "
                  f"x{r['ratio']:.2f} (pairs x{r['median_pair_ratio']:.2f})"
                  + (f"  frozen {r['frozen_ms']:7.1f} ms  learned/frozen x{r['retro_over_frozen']:.2f}"
                     if args.learned else ""), flush=True)
    name = store.path.name.removesuffix("-store") + ("-learned" if args.learned else "")
    out = ROOT / "bench" / "results" / f"retro-step-{name}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
