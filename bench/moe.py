"""Mixture-of-Experts against the dense model at equal active FLOPs per token, on SymPy's source code.

A datastore of a few MB of SymPy 1.13.3 (``--subsets``, bytes tokenizer) is prepared once with ``knnformer
prepare``. Then every variant trains with ``knnformer.trainer.train`` (the trainer the CLI runs: same seed, same
batches, same schedule, same steps) and is scored with ``knnformer.evaluate.evaluate_run`` on the whole valid split:

* ``dense``: SwiGLU of hidden width F (8/3 D rounded up to 32).
* ``top2``: 8 experts of hidden F/2, GShard top-2: two half-width experts per token = F of SwiGLU per token.
* ``top1``: 8 experts of hidden F, Switch top-1: one full-width expert per token.
* ``expert_choice``: 8 experts of hidden F/2, capacity factor 2 (each expert takes 2N/8 tokens of the N in a
  batch: on average two half-width experts per token, EC-CF2 of Zhou et al.).

So every variant multiplies each token by the same number of FFN weights (3 D F per layer, plus D x 8 for the
router; ``flops_per_token`` in model.py, recorded). Capacity padding and dropped tokens are not counted.
Recorded per variant: the valid loss (periodic estimate on fixed windows) against steps and against training
wall-clock (evaluation time excluded), the first step at which it reaches the dense model's final valid loss,
the whole-split valid loss, the MoE statistics and tokens/s. Runs are sequential on a shared machine, so their
wall-clock carries the load of the moment (load averages recorded); the step times that compare the variants
are measured apart, interleaved: ``--speed-rounds`` rounds in which every variant runs ``--speed-steps``
training steps in a rotating order, medians. ``clock_s`` in each curve is steps x that median step time.

    python -m bench.moe [--steps 1000] [--variants dense top2 top1 expert_choice] [--out bench/results/moe.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from knnformer.cli import main as knnformer_main
from knnformer.config import load_config
from knnformer.data.datastore import Datastore
from knnformer.eval.evaluate import evaluate_run
from knnformer.model.transformer import Transformer, flops_per_token
from knnformer.train.inputs import sample_windows
from knnformer.train.optim import make_optimizer
from knnformer.train.trainer import train

VARIANTS = {  # model.* overrides; "half" is replaced by F/2
    "dense": [],
    "top2": ["model.ffn=moe", "model.moe.router=top2", "model.moe.expert_hidden=half"],
    "top1": ["model.ffn=moe", "model.moe.router=top1"],
    "expert_choice": ["model.ffn=moe", "model.moe.router=expert_choice", "model.moe.capacity_factor=2.0",
                      "model.moe.expert_hidden=half"],
}


def base_overrides(args) -> list[str]:
    return [f"model.num_layers={args.layers}", f"model.dim={args.dim}", f"model.num_heads={args.heads}",
            f"model.context={args.context}", "model.vocab_size=256", f"train.steps={args.steps}",
            f"train.batch_size={args.batch}", f"train.lr={args.lr}", f"train.min_lr={args.lr / 10}",
            f"train.warmup_steps={args.steps // 20}", f"train.eval_interval={args.eval_interval}",
            f"train.eval_batches={args.eval_batches}", "train.log_interval=1",
            f"train.checkpoint_interval={args.steps}", "train.keep_checkpoints=1", "train.threads=1"]


def prepare(work: Path, subsets: list[str], sympy: Path) -> Datastore:
    store = work / f"sympy-{'-'.join(subsets)}"
    if not (store / "manifest.json").exists():
        corpus = work / "corpus"  # one folder of copies, so that document ids are paths below sympy/, distinct
        shutil.rmtree(corpus, ignore_errors=True)
        for s in subsets:
            shutil.copytree(sympy / s, corpus / s)
        code = knnformer_main(["-q", "prepare", str(corpus), "--out", str(store), "--force"])
        if code:
            raise SystemExit(f"prepare failed with exit code {code}")
    return Datastore.open(store)


def first_step_reaching(curve: list[dict], target: float) -> int | None:
    return next((row["step"] for row in curve if row["valid_loss"] <= target), None)


def variant_config(name: str, args):
    overrides = base_overrides(args) + VARIANTS[name]
    config = load_config(None, [o for o in overrides if not o.endswith("=half")])
    if any(o.endswith("=half") for o in overrides):
        config.model.moe.expert_hidden = config.model.resolved_ffn_hidden() // 2
    config.validate()
    return config


def step_times(args, store: Datastore) -> dict[str, dict]:
    """Median training-step time of every variant, interleaved in rounds so that load falls on all alike."""
    data = store.split_tokens("train")
    steps = {}
    for name in args.variants:
        config = variant_config(name, args)
        torch.manual_seed(0)
        model = Transformer(config.model).train()
        optimizer = make_optimizer(model, config.train)
        generator = torch.Generator().manual_seed(0)

        def step(model=model, optimizer=optimizer, generator=generator, config=config):
            x, y = sample_windows(data, config.train.batch_size, config.model.context, generator)
            _, loss = model(x, y)
            aux = model.aux_loss()
            (loss if aux is None else loss + aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():  # warmup
        for _ in range(3):
            step()
    for r in range(args.speed_rounds):
        names = list(steps)[r % len(steps):] + list(steps)[: r % len(steps)]
        for name in names:
            for _ in range(args.speed_steps):
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        out[name] = {"step_ms": round(1000 * ts[len(ts) // 2], 1), "p10_ms": round(1000 * ts[len(ts) // 10], 1),
                     "p90_ms": round(1000 * ts[9 * len(ts) // 10], 1)}
    return out


def run_variant(name: str, args, store: Datastore, work: Path) -> dict:
    config = variant_config(name, args)
    run_dir = work / f"run-{name}"
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
            curve.append({"step": row["step"], "train_s": round(clock, 2), "valid_loss": round(row["valid_loss"], 4)})
    evaluated = evaluate_run(run_dir)
    rates = sorted(r["tokens_per_s"] for r in rows[len(rows) // 10 :])
    out = {"model": {k: v for k, v in config.to_dict()["model"].items() if k != "moe" or config.model.ffn == "moe"},
           "flops_per_token": flops_per_token(config.model), "params": None,
           "curve": curve, "final_valid_loss": curve[-1]["valid_loss"], "train_s": round(clock, 1),
           "total_s": round(total_s, 1), "tokens_per_s_median": round(rates[len(rates) // 2]),
           "whole_valid_loss": round(evaluated["loss"], 4), "whole_valid_bpb": round(evaluated["bits_per_byte"], 4),
           "final_train_loss": round(sum(r["loss"] for r in rows[-20:]) / 20, 4)}
    from knnformer.run.record import load_run

    out["params"] = load_run(run_dir)[0].num_params()
    if "moe" in evaluated:
        out["eval_moe"] = evaluated["moe"]
        last = [r for r in rows if "moe" in r][-20:]
        out["train_dropped_last20"] = round(sum(sum(m["dropped"] for m in r["moe"]) / len(r["moe"])
                                                for r in last) / len(last), 4)
        out["train_moe_last"] = rows[-1]["moe"]
    print(f"{name:>14}: valid {out['final_valid_loss']:.4f} (whole split {out['whole_valid_loss']:.4f}), "
          f"{out['train_s']:.0f} s training, {out['tokens_per_s_median']:,} tok/s, "
          f"{out['flops_per_token'] / 1e6:.2f} MFLOP/token, {out['params']:,} params", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--subsets", nargs="+", default=["core", "functions"], help="folders of sympy/ to train on")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--speed-rounds", type=int, default=6)
    p.add_argument("--speed-steps", type=int, default=5)
    p.add_argument("--work", default="/tmp/knnformer-bench-moe", help="folder for the datastore and the runs")
    p.add_argument("--out", default="bench/results/moe.json")
    p.add_argument("--data", default="../shared/data/sympy-1.13.3/files/sympy",
                   help="the sympy/ source folder holding --subsets (default: %(default)s, from the repository root)")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = prepare(work, args.subsets, Path(args.data).resolve())
    load_before = os.getloadavg()
    speed = step_times(args, store)
    print("interleaved step times:", json.dumps(speed), flush=True)
    results = {name: run_variant(name, args, store, work) for name in args.variants}
    for name, r in results.items():
        r["interleaved_step"] = speed[name]
        for row in r["curve"]:
            row["clock_s"] = round(row["step"] * speed[name]["step_ms"] / 1000, 1)
    if "dense" in results:
        target = results["dense"]["final_valid_loss"]
        for name, r in results.items():
            step = first_step_reaching(r["curve"], target)
            r["steps_to_dense_final"] = step
            r["fraction_of_dense_steps"] = None if step is None else round(step / args.steps, 3)
            r["meets_two_thirds_goal"] = step is not None and step <= 2 * args.steps / 3
            row = next((c for c in r["curve"] if c["step"] == step), None)
            r["train_s_to_dense_final"] = row["train_s"] if row else None
            r["clock_s_to_dense_final"] = row["clock_s"] if row else None
    record = {"command": " ".join(["python -m bench.moe", *sys.argv[1:]]), "args": vars(args),
              "datastore": {"subsets": args.subsets, "tokens": store.manifest["num_tokens"],
                            "splits": store.manifest["splits"]},
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": 1,
                          "torch": torch.__version__, "load_before": load_before, "load_after": os.getloadavg()},
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    for name, r in results.items():
        print(f"{name:>14}: final valid {r['final_valid_loss']:.4f}; reaches dense's final valid loss at step "
              f"{r.get('steps_to_dense_final')} of {args.steps} ({r.get('clock_s_to_dense_final')} s at the interleaved "
              f"step time of {r['interleaved_step']['step_ms']} ms)")


if __name__ == "__main__":
    main()
