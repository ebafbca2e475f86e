"""Optimizers against tuned AdamW: steps and wall-clock to reach AdamW's final valid loss (issue 15).

    python -m bench.optimizers [--corpora sympy shakespeare] [--steps 300] [--out bench/results/optimizers.json]

On each corpus (sympy: a reproducible quarter of SymPy 1.13.3, BPE 4096; shakespeare: tiny shakespeare, bytes),
every optimizer of ``train.optimizer`` trains the same model with the trainer (same seed, batches, schedule
shape and steps) at each of its learning rates (``--lrs-*``, three each, all recorded); ``opt-list`` trains the
first ``--opt-list`` entries of the learned NAdamW list (each with its own rate and schedule). The target is
the final periodic valid loss (fixed valid windows) of the best AdamW rate: "tuned AdamW". For every run:
the first evaluated step whose valid loss is at or below the target, and the wall-clock to it. Wall-clock is
steps x the optimizer's median step time, measured apart with all optimizers interleaved in rounds (so that
the load of the shared machine falls on all alike); the runs' own training seconds are recorded beside it.
An optimizer's figure is its best rate; ``opt-list@k`` is the best of the first k entries (trying k entries
costs k runs: the figure is per run, as the list's paper reports it).

Goal (issue 15): some optimizer reaches tuned AdamW's final loss in <= 0.75x its steps and <= 0.9x its
wall-clock on both corpora. The model is far smaller than the ``small`` preset (see ``--layers`` etc.): the
``small`` preset's step takes seconds on this 2-core shared CPU, and this grid is 2 x (12 + N) runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import bench.retrieval as corpora
from bench.speed import git_state, machine
from knnformer.config import load_config
from knnformer.model.transformer import Transformer
from knnformer.train.inputs import sample_windows
from knnformer.train.optim import lr_at, make_optimizer
from knnformer.train.trainer import train

CORPORA = {"sympy": (("bpe", 4096), 4), "shakespeare": (("bytes", 0), 1)}  # tokenizer, 1/N subset


def cpu_flags() -> list[str]:
    """The lscpu flags that matter for these kernels (AVX-512, bf16, AMX)."""
    import subprocess

    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def base_overrides(args, optimizer: str, lr: float) -> list[str]:
    return [f"model.num_layers={args.layers}", f"model.dim={args.dim}", f"model.num_heads={args.heads}",
            f"model.context={args.context}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
            f"train.lr={lr}", f"train.min_lr={lr / 10}", f"train.warmup_steps={args.steps // 20}",
            f"train.eval_interval={args.eval_interval}", f"train.eval_batches={args.eval_batches}",
            "train.log_interval=1", f"train.checkpoint_interval={args.steps}", "train.keep_checkpoints=1",
            "train.threads=1", f"train.optimizer={optimizer}"]


def make_config(args, store, optimizer: str, lr: float):
    config = load_config(None, base_overrides(args, optimizer, lr))
    config.model.vocab_size = store.tokenizer.vocab_size
    return config


def runs_of(args) -> list[tuple[str, str, float]]:
    """(kind, train.optimizer, lr) of every run of ``--optimizers``; opt-list entries bring their own rate
    (train.lr is not read)."""
    out = [(kind, kind, lr) for kind in ("adamw", "muon", "soap", "shampoo") if kind in args.optimizers
           for lr in getattr(args, f"lrs_{kind}")]
    if "opt-list" in args.optimizers:
        out += [("opt-list", f"opt-list:{i}", 1e-3) for i in range(args.opt_list)]
    return out


def step_times(args, store) -> dict[str, dict]:
    """Median step time of each optimizer (forward, backward, clipping, update), interleaved in rounds."""
    data = store.split_tokens("train")
    steps = {}
    for kind, name in [("adamw", "adamw"), ("muon", "muon"), ("soap", "soap"), ("shampoo", "shampoo"),
                       ("opt-list", "opt-list:0")]:
        config = make_config(args, store, name, 1e-3)
        torch.manual_seed(0)
        model = Transformer(config.model).train()
        optimizer = make_optimizer(model, config.train)
        generator = torch.Generator().manual_seed(0)
        counter = [0]

        def step(model=model, optimizer=optimizer, generator=generator, config=config, counter=counter):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(counter[0], config.train) * group.get("lr_scale", 1.0)
            x, y = sample_windows(data, config.train.batch_size, config.model.context, generator)
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            counter[0] += 1

        steps[kind] = step
    for step in steps.values():  # warmup
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    for r in range(args.speed_rounds):
        kinds = list(steps)[r % len(steps):] + list(steps)[: r % len(steps)]
        for kind in kinds:
            # a multiple of 10 steps, so that the preconditioner recomputations of SOAP and Shampoo (every 10)
            # fall into every optimizer's sample alike
            for _ in range(args.speed_steps):
                t0 = time.perf_counter()
                steps[kind]()
                times[kind].append(time.perf_counter() - t0)
    out = {}
    for kind, ts in times.items():
        mean = sum(ts) / len(ts)
        ts = sorted(ts)
        out[kind] = {"mean_ms": round(1000 * mean, 2), "median_ms": round(1000 * ts[len(ts) // 2], 2),
                     "p10_ms": round(1000 * ts[len(ts) // 10], 2), "p90_ms": round(1000 * ts[9 * len(ts) // 10], 2)}
    return out


def run_one(args, store, work: Path, name: str, lr: float) -> dict:
    config = make_config(args, store, name, lr)
    run_dir = work / f"run-{name.replace(':', '-')}-{lr:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    train(run_dir, store, config)
    total_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = config.train.batch_size * config.model.context
    clock, curve = 0.0, []
    for row in rows:
        clock += tokens_per_step / row["tokens_per_s"]
        if "valid_loss" in row:
            curve.append({"step": row["step"], "train_s": round(clock, 2), "valid_loss": round(row["valid_loss"], 4),
                          "valid_bpb": round(row["valid_bpb"], 4)})
    shutil.rmtree(run_dir, ignore_errors=True)
    finite = all(c["valid_loss"] == c["valid_loss"] and c["valid_loss"] < 1e4 for c in curve)
    out = {"optimizer": name, "lr": lr if not name.startswith("opt-list") else None, "curve": curve,
           "final_valid_loss": curve[-1]["valid_loss"] if finite else None,
           "final_valid_bpb": curve[-1]["valid_bpb"] if finite else None,
           "train_s": round(clock, 1), "total_s": round(total_s, 1)}
    print(f"  {name:>12} lr {lr:<8g}: final valid {out['final_valid_loss']} ({out['final_valid_bpb']} bpb), "
          f"{out['train_s']:.0f} s training", flush=True)
    return out


def first_step_reaching(curve: list[dict], target: float) -> int | None:
    return next((c["step"] for c in curve if c["valid_loss"] <= target), None)


def summarise(runs: list[dict], speed: dict, steps: int) -> dict:
    adamw = [r for r in runs if r["optimizer"] == "adamw" and r["final_valid_loss"] is not None]
    tuned = min(adamw, key=lambda r: r["final_valid_loss"])
    target = tuned["final_valid_loss"]
    ref_steps = first_step_reaching(tuned["curve"], target)
    ref_clock = ref_steps * speed["adamw"]["median_ms"] / 1000
    for r in runs:
        kind = "opt-list" if r["optimizer"].startswith("opt-list") else r["optimizer"]
        step = first_step_reaching(r["curve"], target) if r["final_valid_loss"] is not None else None
        r["steps_to_target"] = step
        r["clock_s_to_target"] = None if step is None else round(step * speed[kind]["median_ms"] / 1000, 2)

    def best(candidates):
        reached = [r for r in candidates if r["steps_to_target"] is not None]
        if not reached:
            done = [r for r in candidates if r["final_valid_loss"] is not None]
            b = min(done, key=lambda r: r["final_valid_loss"]) if done else candidates[0]
            return {"optimizer": b["optimizer"], "lr": b["lr"], "steps_to_target": None, "step_ratio": None,
                    "clock_ratio": None, "final_valid_loss": b["final_valid_loss"], "meets_goal": False}
        b = min(reached, key=lambda r: (r["clock_s_to_target"], r["steps_to_target"]))
        step_ratio = b["steps_to_target"] / ref_steps
        clock_ratio = b["clock_s_to_target"] / ref_clock
        return {"optimizer": b["optimizer"], "lr": b["lr"], "steps_to_target": b["steps_to_target"],
                "step_ratio": round(step_ratio, 3), "clock_ratio": round(clock_ratio, 3),
                "final_valid_loss": b["final_valid_loss"], "meets_goal": step_ratio <= 0.75 and clock_ratio <= 0.9}

    table = {kind: best([r for r in runs if r["optimizer"] == kind]) for kind in ("adamw", "muon", "soap", "shampoo")}
    listed = [r for r in runs if r["optimizer"].startswith("opt-list")]
    for k in (1, 3, 10):
        if len(listed) >= k:
            table[f"opt-list@{k}"] = best(listed[:k])
    return {"target_valid_loss": target, "tuned_adamw_lr": tuned["lr"], "adamw_steps_to_target": ref_steps,
            "adamw_clock_s_to_target": round(ref_clock, 2), "steps": steps, "best": table}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lrs-adamw", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    p.add_argument("--lrs-muon", type=float, nargs="+", default=[2e-3, 4e-3, 8e-3])
    p.add_argument("--lrs-soap", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    p.add_argument("--lrs-shampoo", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--opt-list", type=int, default=10, help="train the first N entries of the list")
    p.add_argument("--optimizers", nargs="+", default=["adamw", "muon", "soap", "shampoo", "opt-list"],
                   help="which optimizers to train")
    p.add_argument("--merge", action="store_true",
                   help="add these runs to a corpus already in --out (same settings), keeping its other runs and "
                        "its interleaved step times")
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--speed-rounds", type=int, default=4)
    p.add_argument("--speed-steps", type=int, default=10)
    p.add_argument("--work", default="/tmp/knnformer-bench-optimizers")
    p.add_argument("--out", default="bench/results/optimizers.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report.update({"command": " ".join(["python -m bench.optimizers", *sys.argv[1:]]), "args": vars(args),
                   "machine": {**machine(), "flags": cpu_flags()}, "commit": git_state(),
                   "load_before": os.getloadavg()})
    report.setdefault("corpora", {})
    for corpus in args.corpora:
        corpora.TOKENIZER, corpora.SUBSET = CORPORA[corpus]
        store = corpora.prepare(corpus, work)
        print(f"{corpus}: {store.manifest['num_tokens']:,} tokens, vocab {store.tokenizer.vocab_size}", flush=True)
        before = report["corpora"].get(corpus) if args.merge else None
        speed = before["step_times"] if before else step_times(args, store)
        print("  interleaved step times (ms):", {k: v["median_ms"] for k, v in speed.items()}, flush=True)
        runs = [run_one(args, store, work, name, lr) for _, name, lr in runs_of(args)]
        if before:  # earlier runs of other optimizers or rates, in the order of the full grid
            new = {(r["optimizer"], r["lr"]) for r in runs}
            runs = [r for r in before["runs"] if (r["optimizer"], r["lr"]) not in new] + runs
            order = {"adamw": 0, "muon": 1, "soap": 2, "shampoo": 3}
            runs.sort(key=lambda r: (order.get(r["optimizer"], 4), int(r["optimizer"].partition(":")[2] or 0),
                                     r["lr"] or 0))
        summary = summarise(runs, speed, args.steps)
        report["corpora"][corpus] = {"tokenizer": list(CORPORA[corpus][0]), "subset": f"1/{CORPORA[corpus][1]}",
                                     "train_tokens": len(store.split_tokens("train")), "step_times": speed,
                                     "summary": summary, "runs": runs, "load_after": os.getloadavg()}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))  # after each corpus: a crash keeps what is done
        for kind, b in summary["best"].items():
            print(f"  {kind:>12}: {b}", flush=True)
    met = {c: [k for k, b in report["corpora"][c]["summary"]["best"].items() if b["meets_goal"]]
           for c in report["corpora"]}
    both = set.intersection(*(set(v) for v in met.values())) if met else set()
    report["goal"] = {"met_on": met, "met_on_all_corpora": sorted(both), "load_after": os.getloadavg()}
    out.write_text(json.dumps(report, indent=2))
    print("goal (<= 0.75x steps and <= 0.9x wall-clock of tuned AdamW):", report["goal"], flush=True)


if __name__ == "__main__":
    main()
