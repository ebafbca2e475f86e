"""knnformer: language models that read their own corpus while they write."""

__version__ = "0.1.0"

import os as _os

# OpenMP threads that wait for work sleep instead of spinning, unless the environment chooses a policy. GNU OpenMP
# reads it once, when torch loads, so this holds wherever knnformer is imported before torch (the CLI, torchrun's
# ranks, `python -m bench.X`). Measured beside a CPU-bound process on a shared 2-core machine, training ran many
# times faster than with OpenMP's default spin-waiting (bench/threads.py, BENCHMARKS.md issue 11).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
