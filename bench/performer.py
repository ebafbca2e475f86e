"""Performer (FAVOR+) against softmax attention (SDPA): one causal attention layer of knnformer
(``model.SelfAttention``: qkv projection, rotary, attention, output projection), single thread, fp32.

Training cost: forward + backward time (median of ``--repeats``) and peak memory for T = 256 .. 16384, batch 1.
Peak memory is the growth of the process's peak resident set (Linux ``VmHWM``) over one forward + backward,
measured in a fresh subprocess per point, with the peak reset (``/proc/self/clear_refs``) after the inputs are
built and a 64-token warmup: it counts every torch CPU allocation, which tracemalloc does not see. Decoding cost: milliseconds for one
new token at position L with a KV cache of L keys (softmax) or the running state (Performer), L = 256 .. 16384.

    python -m bench.performer [--max-len 16384] [--out bench/results/performer.json]

Writes the JSON and a PNG plot beside it, and prints a table and the crossover lengths.
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
from pathlib import Path

import torch

from knnformer.config import ModelConfig, PerformerConfig
from knnformer.model.layers import KVCache, SelfAttention, rotary_tables
from knnformer.model.performer import PerformerCache

LAYER = dict(dim=256, num_heads=4)  # head width 64, as in the Performer paper's LRA models


def layer_config(attention: str, context: int, num_features: int, chunk: int) -> ModelConfig:
    return ModelConfig(vocab_size=256, context=context, attention=attention, **LAYER,
                       performer=PerformerConfig(num_features=num_features, chunk_size=chunk))


def read_status(field: str) -> int:
    """A field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def train_point(attention: str, T: int, repeats: int, num_features: int, chunk: int) -> dict:
    """Runs in its own process: peak memory of the first forward + backward, then the median time of repeats."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = layer_config(attention, T, num_features, chunk)
    layer = SelfAttention(config)
    cos, sin = rotary_tables(T, config.dim // config.num_heads, config.rope_theta)
    x = torch.randn(1, T, config.dim, requires_grad=True)
    grad = torch.randn(1, T, config.dim)
    layer(x[:, :64], cos[:64], sin[:64]).sum().backward()  # torch's one-off lazy allocations, not the point's
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        reset = True
    except OSError:
        reset = False
    base = read_status("VmRSS")
    layer(x, cos, sin).backward(grad)
    peak = read_status("VmHWM") - base
    times = []
    for _ in range(repeats):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        layer(x, cos, sin).backward(grad)
        times.append(time.perf_counter() - t0)
    return {"attention": attention, "T": T, "ms": 1000 * statistics.median(times), "ms_all": [1000 * t for t in times],
            "peak_mib": peak / 2**20, "peak_reset": reset}


@torch.no_grad()
def decode_points(lengths: list[int], num_features: int, chunk: int, steps: int = 30) -> list[dict]:
    """Milliseconds for one new token after L tokens: softmax reads L cached keys, the Performer its state."""
    torch.set_num_threads(1)
    rows = []
    for attention in ("softmax", "performer"):
        torch.manual_seed(0)
        config = layer_config(attention, max(lengths) + 1, num_features, chunk)
        layer = SelfAttention(config).eval()
        cos, sin = rotary_tables(config.context, config.dim // config.num_heads, config.rope_theta)
        for L in lengths:
            if attention == "softmax":
                shape = (1, config.num_heads, config.context, config.dim // config.num_heads)
                cache = KVCache([torch.randn(shape)], [torch.randn(shape)])  # one layer's cache
            else:
                cache = PerformerCache.empty(config)
                layer(torch.randn(1, 1, config.dim), cos[:1], sin[:1], cache, 0)  # a state of the right shape
            cache.length = L  # the layer reads the position from the cache; nothing here advances it
            x = torch.randn(1, 1, config.dim)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                layer(x, cos[L : L + 1], sin[L : L + 1], cache, 0)
                times.append(time.perf_counter() - t0)
            state = cache.nbytes() if attention == "performer" else 2 * L * config.dim * 4
            rows.append({"attention": attention, "L": L, "ms_per_token": 1000 * statistics.median(times),
                         "state_bytes": state})
    return rows


def crossover(rows: list[dict], key: str, x: str) -> int | None:
    """The smallest length from which on the Performer is cheaper than softmax at every measured length."""
    soft = {r[x]: r[key] for r in rows if r["attention"] == "softmax"}
    perf = {r[x]: r[key] for r in rows if r["attention"] == "performer"}
    lengths = sorted(soft)
    for i, n in enumerate(lengths):
        if all(perf[m] < soft[m] for m in lengths[i:]):
            return n
    return None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("train", "T", "ms", "forward + backward (ms)"), ("train", "T", "peak_mib", "peak memory (MiB)"),
              ("decode", "L", "ms_per_token", "decoding (ms per token)")]
    for ax, (part, x, y, label) in zip(axes, panels):
        for attention, style in (("softmax", "o-"), ("performer", "s-")):
            rows = [r for r in result[part] if r["attention"] == attention]
            ax.plot([r[x] for r in rows], [max(r[y], 1e-3) for r in rows], style, label=attention)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length" if x == "T" else "tokens already decoded")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    s = result["setting"]
    fig.suptitle(f"one causal attention layer, width {s['dim']}, {s['num_heads']} heads, batch 1, fp32, 1 CPU thread; "
                 f"Performer M={s['num_features']}, chunk {s['chunk_size']}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-len", type=int, default=16384)
    p.add_argument("--num-features", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--out", default="bench/results/performer.json")
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: attention,T,repeats
    args = p.parse_args()
    if args.point:
        attention, T, repeats = args.point.split(",")
        print(json.dumps(train_point(attention, int(T), int(repeats), args.num_features, args.chunk_size)))
        return
    lengths = [256 * 2**i for i in range(8) if 256 * 2**i <= args.max_len]
    load_before = os.getloadavg()
    train = []
    for T in lengths:
        repeats = 5 if T <= 2048 else 3 if T <= 8192 else 2
        for attention in ("softmax", "performer"):
            out = subprocess.run([sys.executable, "-m", "bench.performer", "--point", f"{attention},{T},{repeats}",
                                  "--num-features", str(args.num_features), "--chunk-size", str(args.chunk_size)],
                                 capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            row = json.loads(out.stdout.strip().splitlines()[-1])
            train.append(row)
            print(f"train  {attention:<9} T={T:>6}: {row['ms']:9.1f} ms  peak {row['peak_mib']:8.1f} MiB", flush=True)
    decode = decode_points(lengths, args.num_features, args.chunk_size)
    for row in decode:
        print(f"decode {row['attention']:<9} L={row['L']:>6}: {row['ms_per_token']:.3f} ms/token  "
              f"state {row['state_bytes'] / 2**10:,.0f} KiB")
    result = {
        "what": "one causal knnformer SelfAttention layer, forward+backward and one-token decoding, fp32",
        "setting": {**LAYER, "batch": 1, "num_features": args.num_features, "chunk_size": args.chunk_size,
                    "threads": 1, "torch": torch.__version__, "python": platform.python_version(),
                    "cpu": platform.processor() or platform.machine()},
        "memory_method": "VmHWM - VmRSS over the first forward+backward in a fresh process, VmHWM reset first",
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "train": train, "decode": decode,
        "crossover": {"time_T": crossover(train, "ms", "T"), "memory_T": crossover(train, "peak_mib", "T"),
                      "decode_L": crossover(decode, "ms_per_token", "L")},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    plot(result, out.with_suffix(".png"))
    print(f"crossover: time from T={result['crossover']['time_T']}, memory from T={result['crossover']['memory_T']}, "
          f"decoding from L={result['crossover']['decode_L']}; wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
