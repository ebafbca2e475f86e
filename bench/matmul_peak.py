"""Peak matmul throughput of this machine at torch's current thread count: the denominator of every MFU figure.

Times large square ``a @ b`` products (2 n^3 FLOPs each) in fp32 and bf16 and reports the median GFLOP/s over
several repeats, after a warmup. Run as a script to print (and optionally save) the figures::

    python -m bench.matmul_peak [--n 2048] [--repeats 7] [--threads 2] [--out bench/results/matmul_peak.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int = 7, inner: int = 0) -> list[float]:
    """GFLOP/s of ``repeats`` timed batches of n x n matmuls (each batch runs ``inner`` products, about 0.5 s)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):  # warmup: first calls pick kernels and fault in memory
        torch.mm(a, b, out=out)
    if inner <= 0:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        inner = max(1, int(0.5 / max(time.perf_counter() - t0, 1e-6)))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        rates.append(2 * n**3 * inner / (time.perf_counter() - t0) / 1e9)
    return rates


def measure_peaks(n: int = 2048, repeats: int = 7) -> dict:
    """Median fp32 and bf16 matmul GFLOP/s (plus every repeat) at the current ``torch.get_num_threads()``."""
    result = {"threads": torch.get_num_threads(), "n": n, "repeats": repeats, "torch": torch.__version__}
    for name, dtype in DTYPES.items():
        rates = matmul_gflops(n, dtype, repeats)
        result[name] = {"median_gflops": statistics.median(rates), "max_gflops": max(rates),
                        "all_gflops": [round(r, 1) for r in rates]}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048, help="matrix side (default 2048)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure_peaks(args.n, args.repeats)
    for name in DTYPES:
        r = result[name]
        print(f"{name:>8}: {r['median_gflops']:7.1f} GFLOP/s median (max {r['max_gflops']:.1f}) "
              f"on {result['threads']} threads, n={args.n}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
