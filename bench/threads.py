"""Training beside a CPU-bound competitor: which thread setting survives a shared machine.

Each measurement is a fresh process (OpenMP reads its environment once, when torch loads) that trains the
shakespeare-char model (4 layers x 128, context 64, batch 12, fp32, AdamW) for ``--seconds`` and reports its
steps/s. Variants: torch's default (one thread per CPU, OpenMP's default spin-waiting), ``OMP_WAIT_POLICY=PASSIVE``
(threads that wait sleep instead of spinning), one thread, threads from the cores free at start
(``runtime.free_cores``) plus PASSIVE, and knnformer's default (``import knnformer`` before torch, which sets
PASSIVE unless the environment chooses a policy, and torch's thread count). Each runs alone and beside a competitor (a Python loop that keeps one
core busy), in rounds that rotate the order, so the shared machine's own load falls on all alike.

    python -m bench.threads [--rounds 3] [--seconds 6] [--out bench/results/threads.json]
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

VARIANTS = {  # name: (environment, threads; -1 = runtime.free_cores; -2 = knnformer imported before torch)
    "default": ({}, 0),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
    "one_thread": ({}, 1),
    "free_cores": ({"OMP_WAIT_POLICY": "PASSIVE"}, -1),
    "knnformer": ({}, -2),
}
COMPETITOR = "import time\nend = time.time() + {s}\nx = 0\nwhile time.time() < end:\n    x += 1\n"


def worker(seconds: float, threads: int) -> None:
    """Train for ``seconds`` (after 5 warmup steps); print steps/s and the threads used as JSON."""
    if threads == -2:  # as the CLI does: knnformer before torch, so its OpenMP policy is in place when torch loads
        import knnformer  # noqa: F401
    import numpy as np
    import torch

    from knnformer.config import ModelConfig, TrainConfig
    from knnformer.model.transformer import Transformer
    from knnformer.runtime import free_cores
    from knnformer.train.optim import make_optimizer

    if threads == -1:
        threads = free_cores()
    threads = max(threads, 0)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=256, context=64, num_layers=4, num_heads=4, dim=128)
    model = Transformer(mcfg)
    opt = make_optimizer(model, TrainConfig())
    gen = torch.Generator().manual_seed(0)
    data = torch.from_numpy(np.random.default_rng(0).integers(0, 256, 200_000).astype(np.int64))

    def step() -> None:
        starts = torch.randint(len(data) - 65, (12,), generator=gen)
        w = data[starts[:, None] + torch.arange(65)]
        _, loss = model(w[:, :-1], w[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    print(json.dumps({"steps_per_s": steps / (time.perf_counter() - t0), "threads": torch.get_num_threads()}))


def measure(name: str, seconds: float, competitor: bool) -> dict:
    env_add, threads = VARIANTS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(env_add)
    rival = None
    if competitor:
        rival = subprocess.Popen([sys.executable, "-c", COMPETITOR.format(s=seconds + 30)])
        time.sleep(0.5)
    try:
        out = subprocess.run([sys.executable, "-m", "bench.threads", "--worker", "--seconds", str(seconds),
                              "--threads", str(threads)], env=env, capture_output=True, text=True, check=True)
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "threads.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.seconds, args.threads)
        return
    from bench.speed import git_state, machine  # imports torch: not in a worker, whose OpenMP must start clean
    from knnformer.runtime import cpu_flags

    report = {"command": " ".join(["python -m bench.threads", *sys.argv[1:]]), "git": git_state(),
              "machine": {**machine(), "flags_bf16": sorted(f for f in cpu_flags() if "bf16" in f or "amx" in f)},
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg_start": os.getloadavg(),
              "runs": []}
    names = list(VARIANTS)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for competitor in (False, True):
            for name in order:
                res = measure(name, args.seconds, competitor)
                res.update(variant=name, competitor=competitor, round=r, load_avg=os.getloadavg()[0])
                report["runs"].append(res)
                print(f"round {r} {name:<11} {'beside competitor' if competitor else 'alone':<18} "
                      f"{res['steps_per_s']:6.2f} steps/s ({res['threads']} threads, load {res['load_avg']:.1f})",
                      flush=True)
    report["load_avg_end"] = os.getloadavg()
    summary = {}
    for name in names:
        for competitor in (False, True):
            values = [x["steps_per_s"] for x in report["runs"] if x["variant"] == name and x["competitor"] == competitor]
            summary.setdefault(name, {})["beside_competitor" if competitor else "alone"] = statistics.median(values)
    report["median_steps_per_s"] = summary
    for name, s in summary.items():
        print(f"{name:<11} alone {s['alone']:6.2f}  beside a competitor {s['beside_competitor']:6.2f} steps/s "
              f"({s['beside_competitor'] / s['alone']:.2f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
