"""How torch runs, as every layer above the model sets it: ``autocast`` (bf16 autocast, or nothing for fp32) and
``torch_threads`` (torch's intra-op thread count for a block, restored afterwards).

It is a base module, beside ``config`` and ``io``, because training, evaluation (the kNN-LM included) and the
experiments all run models the same way, and training and evaluation may not import each other.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

logger = logging.getLogger(__name__)


def autocast(dtype: str, device: torch.device):
    """bf16 or fp16 autocast on ``device`` (``auto``: the precision ``choose_dtype`` picks there), or nothing."""
    dtype = resolved_dtype(dtype, device)
    if dtype in ("bfloat16", "float16"):
        return torch.autocast(device.type, dtype=getattr(torch, dtype))
    return nullcontext()


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run with ``num_threads`` torch intra-op threads (0: leave torch's setting), restored afterwards. On a
    machine shared with other busy processes one thread can be many times faster than two (measured here:
    a forward pass over 32k tokens took 2.2 s on one thread, 34.5 s on two)."""
    before = torch.get_num_threads()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- the machine a run lands on: device and precision ---------------------------------------------------------

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 arithmetic (Zen 4+/Cooper Lake+, Sapphire Rapids AMX)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA, then MPS, then the CPU; an explicit device that is not there is a one-line error."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}: use {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for but CUDA is not available here (torch "
                             f"{torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} asked for but MPS is not available here; use --device cpu or auto")
    elif device.type != "cpu":
        raise ValueError(f"unknown device {name!r}: use {DEVICE_CHOICES}")
    return device


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def choose_dtype(requested: str, device: torch.device, flags: frozenset[str] | set[str] | None = None) -> tuple[str, str]:
    """The precision a run computes in and why: an explicit ``float32|bfloat16|float16`` is kept; ``auto`` takes
    bf16 where the hardware runs it natively (a CUDA device that supports it; a CPU whose flags show avx512_bf16
    or AMX) and fp32 elsewhere. Measured: bf16 autocast was 15x slower than fp32 on an AVX2-only CPU (Zen 3) and
    1.68x faster on one with AVX512-BF16. ``flags`` overrides the CPU's own (tests)."""
    if requested != "auto":
        return requested, f"{requested} as configured"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
        return "float32", f"auto: {torch.cuda.get_device_name(device)} lacks bf16"
    if device.type == "cpu":
        flags = cpu_flags() if flags is None else flags
        native = [f for f in BF16_CPU_FLAGS if f in flags]
        if native:
            return "bfloat16", f"auto: the CPU has native bf16 ({', '.join(native)})"
        return "float32", "auto: the CPU has no native bf16 (no avx512_bf16 or AMX flag), where bf16 is slower"
    return "float32", f"auto: fp32 on {device.type}"


def resolved_dtype(dtype: str, device: torch.device) -> str:
    return choose_dtype(dtype, device)[0] if dtype == "auto" else dtype


# --- threads on a shared machine ------------------------------------------------------------------------------


def busy_cores(seconds: float = 0.25) -> float:
    """How many cores other work kept busy over ``seconds`` (from /proc/stat; 0.0 where it cannot be read)."""
    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle
    first = sample()
    if first is None:
        return 0.0
    time.sleep(seconds)
    second = sample()
    total, idle = second[0] - first[0], second[1] - first[1]
    cpus = os.cpu_count() or 1
    return max(0.0, cpus * (1.0 - idle / total)) if total > 0 else 0.0


def free_cores(ranks_here: int = 1) -> int:
    """Torch threads for one of ``ranks_here`` processes on this machine: the CPUs this process may run on, less
    the cores other processes keep busy now (rounded), shared among the ranks, at least 1."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    free = allowed - int(busy_cores() + 0.5)
    return max(1, free // max(1, ranks_here))

