"""Runs: checkpoints, run records, batches, refreshed neighbours and the embedders that read a run.

Importing the package registers the ``run:RUN`` embedder with ``knnformer.retrieval.embedders``."""

from knnformer.run import embedder as _embedder  # noqa: F401  (registers run:RUN)
