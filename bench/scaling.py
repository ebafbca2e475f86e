"""Scaling on this machine: 1 rank against 2 (DDP, FSDP2) on gloo, each rank one thread.

Each measurement is a ``torchrun`` of this file's worker, which trains the shakespeare-char model (4 layers x 128,
context 64, 12 windows per rank, fp32, AdamW: weak scaling, the global batch grows with the ranks) through
knnformer's own ``train.parallel`` wrapping and reports the median step time, tokens/s over all ranks, the share
of a step spent communicating (a step with the gradient all-reduce against one under ``no_sync``, DDP only), the
bytes of parameters + gradients + optimizer state each rank holds (local shards for FSDP) and each rank's peak
RSS. Variants run in rounds with a rotating order so the shared machine's load falls on all alike; the load
average is recorded before and after each.

    python -m bench.scaling [--rounds 2] [--steps 30] [--out bench/results/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name: (ranks, train.parallel, cpu offload)
    "1rank": (1, "none", False),
    "ddp2": (2, "ddp", False),
    "fsdp2": (2, "fsdp", False),
}
# FSDP's CPU offload (CPUOffloadPolicy) needs an accelerator: on this CPU-only machine it raised "Cannot access
# accelerator device when none is available", so it is not a variant here (train.fsdp_cpu_offload is skipped on CPU)


def worker(parallel_kind: str, offload: bool, steps: int, out: str) -> None:
    import resource

    import torch

    from knnformer.config import ModelConfig, TrainConfig
    from knnformer.model.transformer import Transformer
    from knnformer.train import parallel
    from knnformer.train.optim import make_optimizer

    torch.set_num_threads(1)
    world, device = parallel.start("cpu")
    cfg = TrainConfig(parallel=parallel_kind, fsdp_cpu_offload=offload)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, context=64, num_layers=4, num_heads=4, dim=128))
    step_model = parallel.wrap(model, cfg, world, device)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(world.rank)
    data = torch.randint(0, 256, (200_000,), generator=torch.Generator().manual_seed(0))

    def step(sync: bool = True) -> float:
        starts = torch.randint(len(data) - 65, (12,), generator=gen)
        w = data[starts[:, None] + torch.arange(65)]
        parallel.barrier()
        t0 = time.perf_counter()
        with parallel.accumulating(step_model, last=sync):
            _, loss = step_model(w[:, :-1], w[:, 1:])
            loss.backward()
        if sync:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    times = [step() for _ in range(steps)]
    local = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        local += t.numel() * t.element_size() * 2  # the parameter and its gradient
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                t = v.to_local() if hasattr(v, "to_local") else v
                local += t.numel() * t.element_size()
    unsynced = [step(sync=False) for _ in range(steps // 2)] if parallel_kind in ("ddp", "none") else []
    result = {"rank": world.rank, "median_step_s": statistics.median(times),
              "median_step_no_sync_s": statistics.median(unsynced) if unsynced else None,
              "param_grad_optim_bytes": local, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    results = [result]
    if world.size > 1:
        import torch.distributed as dist

        results = [None] * world.size
        dist.all_gather_object(results, result)
    if world.main:
        Path(out).write_text(json.dumps({"world_size": world.size, "ranks": results}))
    parallel.stop()


def measure(name: str, steps: int, tmp: Path) -> dict:
    ranks, kind, offload = VARIANTS[name]
    out = tmp / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
           "bench.scaling", "--worker", "--parallel", kind, "--steps", str(steps), "--result", str(out)]
    if offload:
        cmd.append("--offload")
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr[-1500:], "load_avg_before": load}
    found = json.loads(out.read_text())
    step_s = max(r["median_step_s"] for r in found["ranks"])
    res = {"ranks": ranks, "median_step_s": step_s, "tokens_per_s": ranks * 12 * 64 / step_s,
           "param_grad_optim_bytes_per_rank": found["ranks"][0]["param_grad_optim_bytes"],
           "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in found["ranks"]),
           "load_avg_before": load, "load_avg_after": os.getloadavg()[0]}
    no_sync = [r["median_step_no_sync_s"] for r in found["ranks"] if r["median_step_no_sync_s"]]
    if no_sync and ranks > 1:
        res["communication_share"] = max(0.0, 1 - max(no_sync) / step_s)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="none", help=argparse.SUPPRESS)
    p.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.parallel, args.offload, args.steps, args.result)
        return
    import tempfile

    from bench.speed import git_state, machine
    from knnformer.io import atomic_write_text

    report = {"command": " ".join(["python -m bench.scaling", *sys.argv[1:]]), "git": git_state(),
              "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "load_avg_start": os.getloadavg(), "runs": []}
    names = list(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                res = {"variant": name, "round": r, **measure(name, args.steps, Path(tmp))}
                report["runs"].append(res)
                print(json.dumps(res)[:300], flush=True)
    report["load_avg_end"] = os.getloadavg()
    summary = {}
    for name in names:
        ok = [x for x in report["runs"] if x["variant"] == name and "error" not in x]
        if not ok:
            summary[name] = {"error": next(x["error"] for x in report["runs"] if x["variant"] == name)[-300:]}
            continue
        summary[name] = {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in ok),
                         "median_step_s": statistics.median(x["median_step_s"] for x in ok),
                         "param_grad_optim_bytes_per_rank": ok[0]["param_grad_optim_bytes_per_rank"],
                         "peak_rss_mb_per_rank": statistics.median(x["peak_rss_mb_per_rank"] for x in ok)}
        shares = [x["communication_share"] for x in ok if "communication_share" in x]
        if shares:
            summary[name]["communication_share"] = statistics.median(shares)
    base = summary["1rank"].get("tokens_per_s")
    if base and "tokens_per_s" in summary["ddp2"]:
        summary["ddp2"]["speedup_vs_1rank"] = summary["ddp2"]["tokens_per_s"] / base
        summary["ddp2"]["ideal_over_actual"] = 2 / summary["ddp2"]["speedup_vs_1rank"]
    if "param_grad_optim_bytes_per_rank" in summary["fsdp2"]:
        summary["fsdp2"]["memory_vs_ddp"] = (summary["fsdp2"]["param_grad_optim_bytes_per_rank"]
                                             / summary["ddp2"]["param_grad_optim_bytes_per_rank"])
    report["summary"] = summary
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
