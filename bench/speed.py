"""Training throughput: knnformer's training step against a nanoGPT-style reference and x-transformers.

For each setting every variant trains on the same bytes (tiny shakespeare) in the same process. After a warmup
(which includes any ``torch.compile`` time, reported apart), the timed steps run in rounds: each round gives
every variant ``--steps-per-round`` consecutive steps, in a rotating order, so that load from other processes on
a shared machine falls on all variants alike. Reported: the median step time as tokens/s, MFU against the
measured fp32 and bf16 matmul peaks (``bench/matmul_peak.py``, measured before and after), and every variant's
ratio to the nanoGPT reference. A variant that raises is recorded with its error and skipped. Re-running one
setting (``--settings wide``) replaces only that setting's entry in the JSON.

    python -m bench.speed [--settings small wide] [--rounds 10] [--out bench/results/speed.json]
        [--data ../shared/data/tinyshakespeare/input.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench import nanogpt_ref
from bench.matmul_peak import measure_peaks
from knnformer.config import ModelConfig, TrainConfig
from knnformer.model.transformer import Transformer, flops_per_token
from knnformer.runtime import autocast
from knnformer.train.inputs import sample_windows
from knnformer.train.optim import lr_at, make_optimizer

# name: (layers, heads, width, context, batch); vocabulary: 256 bytes
SETTINGS = {
    "small": dict(num_layers=4, num_heads=4, dim=128, context=64, batch=12),  # nanoGPT's CPU setting
    "wide": dict(num_layers=8, num_heads=8, dim=512, context=256, batch=8),
}
STEPS = {"small": dict(warmup=15, per_round=10), "wide": dict(warmup=3, per_round=2)}


@dataclass
class Variant:
    name: str
    step: Callable[[], float]  # one training step, returns the loss
    flops_per_token: float
    dtype: str  # the precision of its matmuls: float32 or bfloat16


def nanogpt_variant(s: dict, data: np.ndarray, seed: int) -> Variant:
    """The reference: nanoGPT's model, optimizer and step, batches drawn as nanoGPT's ``get_batch`` does."""
    torch.manual_seed(seed)
    config = nanogpt_ref.GPTConfig(block_size=s["context"], vocab_size=256, n_layer=s["num_layers"],
                                   n_head=s["num_heads"], n_embd=s["dim"])
    model = nanogpt_ref.GPT(config)
    optimizer = nanogpt_ref.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
    B, T = s["batch"], s["context"]

    def step() -> float:
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return nanogpt_ref.train_step(model, optimizer, x, y, grad_clip=1.0)

    return Variant("nanogpt", step, nanogpt_ref.flops_per_token(config), "float32")


def xtransformers_variant(s: dict, data: np.ndarray, seed: int) -> Variant:
    """x-transformers' decoder of the same size: learned positions, LayerNorm, GELU 4x MLP, SDPA, tied head."""
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(seed)
    D, H = s["dim"], s["num_heads"]
    model = TransformerWrapper(num_tokens=256, max_seq_len=s["context"], tie_embedding=True,
                               attn_layers=Decoder(dim=D, depth=s["num_layers"], heads=H, attn_dim_head=D // H,
                                                   attn_flash=True, ff_mult=4, ff_no_bias=True))
    optimizer = nanogpt_ref.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
    generator = torch.Generator().manual_seed(seed + 1)
    B, T = s["batch"], s["context"]

    def step() -> float:
        x, y = sample_windows(data, B, T, generator)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    config = nanogpt_ref.GPTConfig(block_size=T, vocab_size=256, n_layer=s["num_layers"], n_head=H, n_embd=D)
    return Variant("x-transformers", step, nanogpt_ref.flops_per_token(config), "float32")


def knnformer_variant(s: dict, data: np.ndarray, seed: int, dtype: str, compile: bool) -> Variant:
    """knnformer's step as ``trainer.train`` runs it (grad_accum 1): lr schedule, forward under autocast,
    backward, ``loss.item()``, clip, AdamW, zero grads."""
    torch.manual_seed(seed)
    mcfg = ModelConfig(vocab_size=256, context=s["context"], num_layers=s["num_layers"], num_heads=s["num_heads"],
                       dim=s["dim"])
    cfg = TrainConfig(batch_size=s["batch"], dtype=dtype, compile=compile, steps=100_000)
    model = Transformer(mcfg)
    optimizer = make_optimizer(model, cfg)
    step_model = torch.compile(model) if compile else model
    model.train()
    generator = torch.Generator().manual_seed(seed + 1)
    device = torch.device("cpu")
    counter = [0]

    def step() -> float:
        lr = lr_at(counter[0], cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = sample_windows(data, cfg.batch_size, mcfg.context, generator)
        with autocast(cfg.dtype, device):
            _, loss = step_model(x.to(device), y.to(device))
        loss.backward()
        loss_value = loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(grad_norm)  # the trainer logs it every step
        counter[0] += 1
        return loss_value

    name = f"knnformer {'bf16' if dtype == 'bfloat16' else 'fp32'} {'compile' if compile else 'eager'}"
    return Variant(name, step, flops_per_token(mcfg), dtype)


def build_variants(s: dict, data: np.ndarray, seed: int, only: list[str] | None):
    builders = [("nanogpt", lambda: nanogpt_variant(s, data, seed)),
                ("x-transformers", lambda: xtransformers_variant(s, data, seed))]
    for compile in (False, True):
        for dtype in ("float32", "bfloat16"):
            name = f"knnformer {'bf16' if dtype == 'bfloat16' else 'fp32'} {'compile' if compile else 'eager'}"
            builders.append((name, lambda d=dtype, c=compile: knnformer_variant(s, data, seed, d, c)))
    return [(n, b) for n, b in builders if only is None or n in only or n == "nanogpt"]


def run_setting(name: str, s: dict, data: np.ndarray, rounds: int, only, seed: int = 1337) -> dict:
    tokens_per_step = s["batch"] * s["context"]
    steps = STEPS[name]
    variants, errors, warmup_s, losses = [], {}, {}, {}
    for vname, build in build_variants(s, data, seed, only):
        try:
            v = build()
            t0 = time.perf_counter()
            losses[vname] = [v.step() for _ in range(steps["warmup"])]
            warmup_s[vname] = time.perf_counter() - t0
            variants.append(v)
            print(f"  [{name}] {vname}: warmup {warmup_s[vname]:.1f}s, loss {losses[vname][-1]:.3f}", flush=True)
        except Exception as e:  # a variant that fails is reported, not fatal
            errors[vname] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"  [{name}] {vname}: FAILED {errors[vname]}", flush=True)
            traceback.print_exc(limit=3)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            for _ in range(steps["per_round"]):
                t0 = time.perf_counter()
                losses[v.name].append(v.step())
                times[v.name].append(time.perf_counter() - t0)
    results = {}
    for v in variants:
        med = statistics.median(times[v.name])
        tps = tokens_per_step / med
        achieved = v.flops_per_token * tps / 1e9
        results[v.name] = {
            "tokens_per_s": tps,
            "step_ms_median": med * 1e3,
            "step_ms_p10_p90": [float(np.percentile(times[v.name], 10)) * 1e3,
                                float(np.percentile(times[v.name], 90)) * 1e3],
            "timed_steps": len(times[v.name]),
            "warmup_s": warmup_s[v.name],
            "flops_per_token": v.flops_per_token,
            "achieved_gflops": achieved,
            "matmul_dtype": v.dtype,
            "last_loss": losses[v.name][-1],
        }
    base = results.get("nanogpt", {}).get("tokens_per_s")
    for r in results.values():
        r["ratio_to_nanogpt"] = r["tokens_per_s"] / base if base else None
    return {"setting": {**s, "vocab_size": 256, "tokens_per_step": tokens_per_step, **steps, "rounds": rounds},
            "variants": results, "errors": errors}


def machine() -> dict:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except Exception:
        model = platform.processor()
    from knnformer.runtime import cpu_flags

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))  # what the kernels use
    return {"cpu": model, "cpus": os.cpu_count(), "flags": flags, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def git_state() -> str:
    """The commit the benchmark ran on, with ``+dirty`` when knnformer/ had uncommitted changes."""
    root = Path(__file__).parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "knnformer"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (each runs every variant)")
    p.add_argument("--only", nargs="+", default=None, help="variant names to run (nanogpt always runs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    p.add_argument("--data", type=Path, default=Path("../shared/data/tinyshakespeare/input.txt"),
                   help="the text trained on, as bytes (default: %(default)s, from the repository root)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = np.frombuffer(args.data.read_bytes(), dtype=np.uint8).astype(np.uint16)
    out = Path(args.out)
    # settings not run now keep their earlier results: each setting carries its own peaks, load and commit
    report = json.loads(out.read_text()) if out.exists() else {}
    report["machine"] = machine()
    report.setdefault("settings", {})
    for name in args.settings:
        info = {"command": " ".join(["python -m bench.speed", *sys.argv[1:]]), "git": git_state(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg_start": os.getloadavg()}
        before = measure_peaks(repeats=5)
        result = run_setting(name, SETTINGS[name], data, args.rounds, args.only)
        after = measure_peaks(repeats=5)
        # MFU's denominator: the median of every peak repeat, before and after, per dtype
        peaks = {k: statistics.median(before[k]["all_gflops"] + after[k]["all_gflops"]) for k in ("float32", "bfloat16")}
        info["load_avg_end"] = os.getloadavg()
        info["matmul_peak"] = {"before": before, "after": after, "used_gflops": peaks}
        for vname, r in result["variants"].items():
            r["mfu_vs_fp32_peak"] = r["achieved_gflops"] / peaks["float32"]
            r["mfu_vs_bf16_peak"] = r["achieved_gflops"] / peaks["bfloat16"]
            print(f"{name:>6} {vname:<24} {r['tokens_per_s']:>9,.0f} tok/s  x{r['ratio_to_nanogpt']:.2f} nanoGPT  "
                  f"MFU {100 * r['mfu_vs_fp32_peak']:.1f}% fp32 / {100 * r['mfu_vs_bf16_peak']:.1f}% bf16 peak",
                  flush=True)
        print(f"{name:>6} matmul peak fp32 {peaks['float32']:.0f}, bf16 {peaks['bfloat16']:.0f} GFLOP/s; load "
              f"{info['load_avg_start'][0]:.1f} -> {info['load_avg_end'][0]:.1f}", flush=True)
        report["settings"][name] = {**info, **result}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
