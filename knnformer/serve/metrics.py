"""The server's counters and latency histograms, written in Prometheus's text format (no client library: a
handful of series do not need one). Thread-safe: the engine's worker and the event loop both record."""

from __future__ import annotations

import bisect
import threading

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HELP = {
    "requests_total": ("counter", "HTTP requests answered, by endpoint and status"),
    "tokens_generated_total": ("counter", "tokens sampled for all requests"),
    "requests_cancelled_total": ("counter", "generations stopped because their client went away"),
    "requests_rejected_total": ("counter", "requests refused with 429 because the queue was full"),
    "queue_length": ("gauge", "requests waiting for a row of the batch"),
    "active_rows": ("gauge", "requests generating now (rows of the batch)"),
    "time_to_first_token_seconds": ("histogram", "from a request's arrival to its first token"),
    "inter_token_seconds": ("histogram", "between two tokens of one request (per-token latency)"),
    "retrieval_seconds": ("histogram", "one search of the index for a completed chunk"),
    "prefill_seconds": ("histogram", "running a prompt (or a rebuilt window) into its cache row"),
    "batch_step_seconds": ("histogram", "one batched decode step of all active rows"),
    "queue_wait_seconds": ("histogram", "from a request's arrival to its admission into the batch"),
    "batch_size": ("histogram", "active rows per batched decode step"),
}
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self, prefix: str = "knnformer_"):
        self.prefix = prefix
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.histograms: dict[str, tuple[list[int], list[float]]] = {}  # name -> (bucket counts, [sum, count])
        self.gauges: dict[str, object] = {}  # name -> callable returning the value now

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0.0) + value

    def observe(self, name: str, value: float) -> None:
        buckets = BATCH_BUCKETS if name == "batch_size" else SECONDS
        with self.lock:
            counts, total = self.histograms.setdefault(name, ([0] * (len(buckets) + 1), [0.0, 0]))
            counts[bisect.bisect_left(buckets, value)] += 1
            total[0] += value
            total[1] += 1

    def gauge(self, name: str, read) -> None:
        self.gauges[name] = read

    def quantile(self, name: str, q: float) -> float | None:
        """An upper bound of quantile ``q`` from the histogram's buckets (None before any observation)."""
        buckets = BATCH_BUCKETS if name == "batch_size" else SECONDS
        with self.lock:
            if name not in self.histograms or not self.histograms[name][1][1]:
                return None
            counts, (_, n) = self.histograms[name]
            seen = 0
            for i, c in enumerate(counts):
                seen += c
                if seen >= q * n:
                    return buckets[i] if i < len(buckets) else float("inf")
        return None

    def render(self) -> str:
        lines = []

        def head(name):
            kind, text = HELP.get(name, ("untyped", name))
            lines.extend([f"# HELP {self.prefix}{name} {text}", f"# TYPE {self.prefix}{name} {kind}"])

        with self.lock:
            for name in sorted({n for n, _ in self.counters}):
                head(name)
                for (n, labels), value in sorted(self.counters.items()):
                    if n == name:
                        label = ",".join(f'{k}="{v}"' for k, v in labels)
                        lines.append(f"{self.prefix}{name}{{{label}}} {value:g}" if label else
                                     f"{self.prefix}{name} {value:g}")
            for name, (counts, (total, n)) in sorted(self.histograms.items()):
                head(name)
                buckets = BATCH_BUCKETS if name == "batch_size" else SECONDS
                cumulative = 0
                for bound, c in zip((*buckets, "+Inf"), counts):
                    cumulative += c
                    lines.append(f'{self.prefix}{name}_bucket{{le="{bound}"}} {cumulative}')
                lines.extend([f"{self.prefix}{name}_sum {total:g}", f"{self.prefix}{name}_count {n}"])
        for name, read in sorted(self.gauges.items()):
            head(name)
            lines.append(f"{self.prefix}{name} {read():g}")
        return "\n".join(lines) + "\n"
