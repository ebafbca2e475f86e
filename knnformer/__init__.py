"""knnformer: language models that read their own corpus while they write."""

__version__ = "0.1.0"

import os as _os

# OpenMP threads that wait for work sleep instead of spinning. Read once, when torch loads (so only where knnformer
# is imported first, as the CLI does). Measured beside a CPU-bound process on a shared 2-core machine, training
# ran 3-20x faster than with OpenMP's default spin-waiting (bench/threads.py, BENCHMARKS.md issue 11).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

