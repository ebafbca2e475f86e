"""Load on ``knnformer serve``: a server started on 127.0.0.1, then one streaming client alone, then N concurrent
streaming clients (default 50) for a fixed time (default 2 minutes), every client sending completions one after
another. Reports errors by status (429s apart, which are deliberate), p50/p99 time to first token and between
tokens, tokens/s in total, and the server's memory (RSS) at the start, during and at the end of the load.

    nice -n 5 python -m bench.serve_load --run RUN [--clients 50] [--seconds 120] [--single-seconds 30]

Goals: zero 5xx under 50 clients; aggregate tokens/s with batching >= 3x one client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.generate_cache import cpu_flags
from bench.speed import git_state, machine
from knnformer.serve.background import free_port


def mib(b: float) -> float:
    return round(b / 2**20, 1)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Tally:
    def __init__(self):
        self.status: dict[str, int] = {}
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.tokens = 0
        self.completed = 0

    def count(self, key) -> None:
        self.status[str(key)] = self.status.get(str(key), 0) + 1

    def summary(self, seconds: float) -> dict:
        return {"seconds": round(seconds, 1), "requests_completed": self.completed, "status": self.status,
                "errors_5xx": sum(n for k, n in self.status.items() if k.startswith("5")),
                "errors_other": sum(n for k, n in self.status.items() if k not in ("200", "429")
                                    and not k.startswith("5")),
                "rejected_429": self.status.get("429", 0), "tokens": self.tokens,
                "tokens_per_s": self.tokens / seconds,
                "ttft_s": {"p50": quantile(self.ttft, 0.5), "p99": quantile(self.ttft, 0.99),
                           "n": len(self.ttft)},
                "inter_token_s": {"p50": quantile(self.gaps, 0.5), "p99": quantile(self.gaps, 0.99)}}


async def one_completion(client: httpx.AsyncClient, url: str, prompt: str, args, tally: Tally) -> None:
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.8, "stream": True}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                tally.count(r.status_code)
                await r.aread()
                if r.status_code == 429:
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                return
            last, first = None, True
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    tally.count("stream-error")
                    return
                now = time.perf_counter()
                if msg["choices"][0]["text"]:
                    if first:
                        tally.ttft.append(now - t0)
                        first = False
                    elif last is not None:
                        tally.gaps.append(now - last)
                    last = now
                if msg.get("usage"):
                    tally.tokens += msg["usage"]["completion_tokens"]
            tally.count(200)
            tally.completed += 1
    except httpx.HTTPError as e:
        tally.count(type(e).__name__)


async def drive(url: str, clients: int, seconds: float, prompts: list[str], args, rss) -> tuple[Tally, float, list]:
    tally, samples = Tally(), []
    end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        async def client_loop(i: int) -> None:
            rng = random.Random(i)
            while time.perf_counter() < end:
                await one_completion(client, url, rng.choice(prompts), args, tally)

        async def sample_memory() -> None:
            while time.perf_counter() < end:
                samples.append((round(seconds - (end - time.perf_counter()), 1), rss()))
                await asyncio.sleep(2.0)

        t0 = time.perf_counter()
        await asyncio.gather(sample_memory(), *(client_loop(i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return tally, elapsed, samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--single-seconds", type=float, default=30)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve-load.json"))
    args = p.parse_args()
    import psutil

    from knnformer.run.record import load_run, open_run_datastore

    _, record, _ = load_run(args.run)
    store = open_run_datastore(record)
    valid = store.split_tokens("valid")
    rng = random.Random(0)
    prompts = []
    for _ in range(200):
        at = rng.randrange(0, len(valid) - 200)
        prompts.append(store.tokenizer.decode(valid[at : at + rng.randrange(32, 160)]))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "knnformer.cli", "serve", args.run, "--port", str(port),
                               "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = psutil.Process(server.pid)

    def rss() -> int:
        return proc.memory_info().rss

    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {server.stdout.read() if server.stdout else ''}")
            time.sleep(0.5)
        load_before = os.getloadavg()
        rss_ready = rss()
        single, single_s, _ = asyncio.run(drive(url, 1, args.single_seconds, prompts, args, rss))
        print(f"1 client: {single.tokens / single_s:.1f} tok/s, ttft p50 {quantile(single.ttft, 0.5)}", flush=True)
        rss_start = rss()
        load, load_s, memory = asyncio.run(drive(url, args.clients, args.seconds, prompts, args, rss))
        rss_end = rss()
        metrics = httpx.get(url + "/metrics", timeout=10).text
        load_after = os.getloadavg()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    s1, sn = single.summary(single_s), load.summary(load_s)
    ratio = sn["tokens_per_s"] / s1["tokens_per_s"] if s1["tokens_per_s"] else None
    memory_mib = [(t, mib(b)) for t, b in memory]
    second_half = [b for t, b in memory if t >= args.seconds / 2]
    result = {
        "command": " ".join(["python -m bench.serve_load", *sys.argv[1:]]), "commit": git_state(),
        "run": args.run, "max_batch": args.max_batch, "max_queue": args.max_queue, "max_tokens": args.max_tokens,
        "single_client": s1, "load": {"clients": args.clients, **sn},
        "aggregate_over_single": ratio,
        "server_rss_mib": {"ready": mib(rss_ready), "load_start": mib(rss_start), "load_end": mib(rss_end),
                           "max": max(b for _, b in memory_mib), "samples": memory_mib,
                           "growth_second_half": mib(max(second_half) - min(second_half)) if second_half else None},
        "goals": {"zero_5xx": sn["errors_5xx"] == 0 and sn["errors_other"] == 0,
                  "aggregate_at_least_3x_single": ratio is not None and ratio >= 3},
        "server_metrics": [line for line in metrics.splitlines() if not line.startswith("#")
                           and ("_count" in line or "_sum" in line or "_total" in line)],
        "machine": {**machine(), "flags": cpu_flags(), "load_before": load_before, "load_after": load_after,
                    "note": "2 shared vCPUs; the clients run on the same machine as the server"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("single_client", "load", "aggregate_over_single", "goals")}, indent=1))
    print(f"server RSS MiB: ready {mib(rss_ready)}, load start {mib(rss_start)}, end {mib(rss_end)}; -> {args.out}")


if __name__ == "__main__":
    main()
