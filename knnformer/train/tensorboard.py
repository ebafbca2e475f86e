"""Optional TensorBoard event files (``train.tensorboard: true``): every step's scalar metrics under
``RUN/tensorboard/``, written through ``torch.utils.tensorboard`` when the ``tensorboard`` package is installed; a
one-line error naming the package when it is not. ``metrics.jsonl`` stays the run's record either way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

SKIP = {"step"}


class TensorBoard:
    """A ``SummaryWriter`` fed by the trainer's per-step hook."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, run_dir: str | Path, enabled: bool) -> TensorBoard | None:
        if not enabled:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("train.tensorboard is true but the tensorboard package is not installed: "
                             "pip install tensorboard, or drop the setting (metrics.jsonl has every figure)") from None
        return cls(SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), flush_secs=10))

    def write(self, row: dict[str, Any]) -> None:
        """The row's numbers as scalars (``train/loss``, ``valid/valid_loss``, ``moe/layer0_dropped``...)."""
        step = row["step"]
        for key, value in row.items():
            if key in SKIP or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                group = "valid" if key.startswith("valid_") else "refresh" if key.startswith("refresh") else "train"
                self.writer.add_scalar(f"{group}/{key}", value, step)
        for layer in row.get("moe") or []:
            for key in ("dropped", "balance_loss", "z_loss"):
                self.writer.add_scalar(f"moe/layer{layer['layer']}_{key}", layer[key], step)

    def hook(self, on_step: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None]:
        """``on_step`` that also writes each row here."""

        def both(row: dict[str, Any]) -> None:
            self.write(row)
            if on_step is not None:
                on_step(row)

        return both

    def close(self) -> None:
        self.writer.close()
