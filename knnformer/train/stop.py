"""A clean stop on Ctrl-C: the first one only sets a flag, which the training loop checks between optimizer
steps, so the run saves a checkpoint at a step boundary and returns; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal


class StopRequested:
    """Turns the first Ctrl-C into a flag the loop checks between steps; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: Ctrl-C is not ours to catch
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
