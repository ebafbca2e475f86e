"""Retrieval: frozen embedders of chunk text (``embedders``), the dense and BM25 indexes (``index``), the search
for neighbours under the leakage rules (``search``, ``hops``), the ``knnformer index`` stage that writes them
(``build``), reading precomputed neighbours back (``neighbours``) and live search at generation time (``live``).

It imports only the base modules and ``data``. It knows no models and no runs: an embedder defined above it (a
run's own, ``run:RUN``) registers itself with ``embedders.register_embedder``, and a run's refreshed neighbours
come back as the same ``neighbours.Neighbours``.
"""
