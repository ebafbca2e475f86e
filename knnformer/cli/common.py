"""What every ``knnformer`` subcommand shares: one-line messages on stderr, the exception that ends a run the
user stopped, and the training events printed above a progress bar."""

from __future__ import annotations

import sys


class Interrupted(Exception):
    """Training stopped on request with its checkpoint saved; ``main`` exits with 130."""


def say(message: str) -> None:
    print(f"knnformer: {message}", file=sys.stderr, flush=True)


def write_events(bar, row: dict) -> None:
    """Print the training events of a metrics row above the progress bar: Performer redraws, index refreshes."""
    if row.get("redraw"):
        bar.write(f"step {row['step']:>6}: drew new Performer random features")
    if "refresh" in row:
        started = row.get("refresh_started", row["step"] - 1)
        how = (f"re-embedded and re-indexed in {row['refresh_seconds']:.1f} s (training paused)"
               if started == row["step"] - 1 else
               f"re-embedded and re-indexed in the background from the weights of step {started} "
               f"({row.get('refresh_cpu_seconds', 0):.1f} s CPU), training paused {row['refresh_seconds']:.1f} s")
        bar.write(f"step {row['step']:>6}: refresh {row['refresh']}: {how}, {row['refresh_changed']:.1%} of chunks "
                  f"got new neighbours, index recall@10 {row['refresh_recall']:.3f}")
