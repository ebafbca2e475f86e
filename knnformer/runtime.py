"""How torch runs, as every layer above the model sets it: ``autocast`` (bf16 autocast, or nothing for fp32) and
``torch_threads`` (torch's intra-op thread count for a block, restored afterwards).

It is a base module, beside ``config`` and ``io``, because training, evaluation (the kNN-LM included) and the
experiments all run models the same way, and training and evaluation may not import each other.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

logger = logging.getLogger(__name__)


def autocast(dtype: str, device: torch.device):
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
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
