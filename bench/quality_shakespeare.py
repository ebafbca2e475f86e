"""Quality at nanoGPT's CPU setting: tiny shakespeare on raw bytes, ``--config shakespeare-char``, 2000 steps.

Prepares the datastore and trains through the ``knnformer`` CLI exactly as a user would, then scores the whole
valid split with ``knnformer evaluate RUN --json``. Each knnformer variant (``--variants``: fp32, bf16,
bf16-compile, fp32-compile) is the preset with ``--set train.dtype=...``/``train.compile=...``. For an
apples-to-apples loss and wall time, the nanoGPT-style reference (``bench/nanogpt_ref.py``) is trained in-process
on the same train tokens with nanoGPT's schedule (lr 1e-3, 100 warmup steps, cosine to 1e-4 at 2000, AdamW
0.9/0.99, weight decay 0.1, clip 1) and scored on the same valid windows. Goal: valid loss <= 1.88, nanoGPT's
figure for this setting.

    python -m bench.quality_shakespeare [--variants fp32 bf16] [--reference] [--out bench/results/quality_shakespeare.json]
        [--data ../shared/data/tinyshakespeare/input.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench import nanogpt_ref
from bench.speed import git_state, machine
from knnformer.config import load_config
from knnformer.data.datastore import Datastore
from knnformer.eval.evaluate import summarize
from knnformer.eval.scoring import score_tokens
from knnformer.train.optim import lr_at

HERE = Path(__file__).parent
GOAL = 1.88
VARIANTS = {
    "fp32": [],
    "bf16": ["train.dtype=bfloat16"],
    "fp32-compile": ["train.compile=true"],
    "bf16-compile": ["train.dtype=bfloat16", "train.compile=true"],
}


def knnformer_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "knnformer.cli", "-q", *args]
    print("$ knnformer " + " ".join(args[:1] + tuple(a for a in args[1:])), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"knnformer {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def prepare(work: Path, corpus: Path) -> Path:
    store = work / "shakespeare-bytes"
    if not (store / "manifest.json").exists():
        knnformer_cli("prepare", str(corpus), "--out", str(store), "--force")
    return store


def train_variant(name: str, store: Path, work: Path) -> dict:
    run = work / f"run-{name}"
    shutil.rmtree(run, ignore_errors=True)
    sets = [a for s in VARIANTS[name] for a in ("--set", s)]
    t0 = time.perf_counter()
    knnformer_cli("train", str(store), "--out", str(run), "--config", "shakespeare-char", *sets)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in rows if "valid_loss" not in r and r["step"] > 20]  # past warmup/compile
    result = json.loads(knnformer_cli("evaluate", str(run), "--json").stdout)
    # the periodic estimate (20 random valid batches, every 250 steps): when the run first reached the goal
    reached = [r["step"] for r in rows if r.get("valid_loss", float("inf")) <= GOAL]
    return {"command": f"knnformer train {store} --out {run} --config shakespeare-char "
                       + " ".join(f"--set {s}" for s in VARIANTS[name]),
            "train_wall_s": wall, "tokens_per_s_median": statistics.median(rates) if rates else None,
            "final_train_loss": rows[-1]["loss"], "periodic_valid_loss": rows[-1].get("valid_loss"),
            "first_periodic_eval_at_or_below_goal": reached[0] if reached else None,
            "valid": result, "valid_loss": result["loss"], "reaches_goal": result["loss"] <= GOAL,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": git_state()}


def train_reference(store: Path, seed: int = 1337) -> dict:
    """nanoGPT's model and loop on the same tokens; scored on the same valid windows as ``knnformer evaluate``."""
    cfg = load_config("shakespeare-char")
    ds = Datastore.open(store)
    train_data = np.asarray(ds.split_tokens("train"))
    valid_data = np.asarray(ds.split_tokens("valid"))
    B, T = cfg.train.batch_size, cfg.model.context
    torch.manual_seed(seed)
    gcfg = nanogpt_ref.GPTConfig(block_size=T, vocab_size=256, n_layer=cfg.model.num_layers,
                                 n_head=cfg.model.num_heads, n_embd=cfg.model.dim)
    model = nanogpt_ref.GPT(gcfg)
    optimizer = nanogpt_ref.configure_optimizer(model, cfg.train.weight_decay, cfg.train.lr,
                                                (cfg.train.beta1, cfg.train.beta2), "cpu")
    step_times = []
    t0 = time.perf_counter()
    for step in range(cfg.train.steps):
        ts = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.train)  # nanoGPT's get_lr: the same warmup and cosine
        ix = torch.randint(len(train_data) - T, (B,))
        x = torch.stack([torch.from_numpy(train_data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train_data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        loss = nanogpt_ref.train_step(model, optimizer, x, y, cfg.train.grad_clip)
        step_times.append(time.perf_counter() - ts)
        if (step + 1) % 250 == 0:
            print(f"  nanogpt-reference step {step + 1}: loss {loss:.4f}", flush=True)
    wall = time.perf_counter() - t0

    class Scored(torch.nn.Module):  # what score_tokens expects: .config.context and model(x) -> (logits, _)
        def __init__(self, gpt):
            super().__init__()
            self.gpt, self.config = gpt, SimpleNamespace(context=T)

        def forward(self, x):
            return self.gpt(x)

    total = score_tokens(Scored(model), valid_data, ds.tokenizer.token_bytes)
    valid = summarize(total, "valid", T, T)
    return {"command": "in-process: bench/nanogpt_ref.py, shakespeare-char schedule", "train_wall_s": wall,
            "tokens_per_s_median": B * T / statistics.median(step_times[20:]), "final_train_loss": loss,
            "valid": valid, "valid_loss": valid["loss"], "reaches_goal": valid["loss"] <= GOAL,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": git_state()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["fp32", "bf16"], choices=list(VARIANTS))
    p.add_argument("--reference", action="store_true", help="also train the nanoGPT-style reference")
    p.add_argument("--work", default=str(HERE / "results" / "work"), help="datastore and runs (gitignored)")
    p.add_argument("--out", default=str(HERE / "results" / "quality_shakespeare.json"))
    p.add_argument("--data", type=Path, default=Path("../shared/data/tinyshakespeare/input.txt"),
                   help="tiny shakespeare (default: %(default)s, from the repository root)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report.update({"goal_valid_loss": GOAL, "machine": machine(), "load_avg_start": os.getloadavg()})
    report.setdefault("runs", {})
    store = prepare(work, args.data.resolve())

    def save() -> None:  # after every run: a long benchmark that stops keeps what it finished
        report["load_avg_end"] = os.getloadavg()
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out)

    for name in args.variants:
        report["runs"][f"knnformer {name}"] = r = train_variant(name, store, work)
        print(f"knnformer {name}: valid loss {r['valid_loss']:.4f} in {r['train_wall_s']:.0f}s "
              f"({r['tokens_per_s_median']:,.0f} tok/s)", flush=True)
        save()
    if args.reference:
        report["runs"]["nanogpt-reference"] = r = train_reference(store)
        print(f"nanogpt-reference: valid loss {r['valid_loss']:.4f} in {r['train_wall_s']:.0f}s", flush=True)
        save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
