"""Runs: checkpoints, run records, batches, refreshed neighbours and the embedders that read a run.

It may import the base modules, ``data``, ``retrieval`` and ``model``, and it is what ``train``, ``eval`` and
``serve`` share about a run, since those three may not import each other. Importing the package registers the
``run:RUN`` embedder with ``knnformer.retrieval.embedders``."""

from knnformer.run import embedder as _embedder  # noqa: F401  (registers run:RUN)
