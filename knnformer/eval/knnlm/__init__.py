"""kNN-LM (Khandelwal et al., 2020): the model's next-token distribution interpolated with one read off the
nearest stored hidden states of the train split.

    p(w | x)     = lambda * p_knn(w | x) + (1 - lambda) * p_lm(w | x)
    p_knn(w | x) = sum over the k nearest keys j of h(x) whose value v_j = w of softmax_j(-d_j / temperature)

with ``d_j`` the squared L2 distance between ``h(x)``, the model's final normed hidden state, and key j.

- ``store``: the keys (every train position's hidden state, fp16, memory-mapped) and values (the token that
  followed) in ``RUN/knnlm/``, reused while they match the run's newest checkpoint and datastore.
- ``search``: the nearest keys of each query, exactly or through an IVF / IVF-PQ index kept in the store, with
  nprobe and refine chosen by recall against exact search, and searches that resume after a kill.
- ``schedule``: what an evaluation searches, at which k and with which settings (a tuning sample at k_max, the
  scored tokens at the tuned k), and the check of the gain against exact search on a sample.
- ``tune``: p_knn for every k at once, the interpolation, and the search for lambda, k and the temperature
  (and lambda and k per bin of the nearest key's distance).
- ``evaluate``: ``evaluate_knn_lm``, which ties them together on valid or test without tuning on the scored
  tokens, and ``format_table``.

``from knnformer.eval import knnlm; knnlm.evaluate_knn_lm(...)`` is how the CLI calls it.
"""

from knnformer.eval.knnlm.evaluate import DEFAULT_K_MAX, KnnLmSettings, evaluate_knn_lm, figures, format_table
from knnformer.eval.knnlm.schedule import DEFAULT_EXACT_SAMPLE, DEFAULT_TUNE_QUERIES, Queries, search_and_tune
from knnformer.eval.knnlm.search import (
                                         DEFAULT_MEMORY_BUDGET,
                                         DEFAULT_RECALL,
                                         EXACT_MAX_WORK,
                                         INDEX_KINDS,
                                         INDEX_VERSION,
                                         KeySearch,
                                         build_ivf,
                                         choose_index_kind,
                                         choose_settings,
                                         exact_l2,
                                         index_bytes,
                                         open_key_search,
                                         recall,
                                         search_resumable,
)
from knnformer.eval.knnlm.store import (
                                         FORMAT_VERSION,
                                         STORE_DIR,
                                         KnnStore,
                                         open_or_build_queries,
                                         open_or_build_store,
                                         split_hidden_states,
                                         store_identity,
)
from knnformer.eval.knnlm.tune import (
                                         LAMBDA_BINS,
                                         LAMBDAS,
                                         grid_losses,
                                         interpolate,
                                         interpolate_by_distance,
                                         k_grid,
                                         knn_logprobs,
                                         temperature_scale,
                                         tune,
                                         tune_by_distance,
)

__all__ = [
    "DEFAULT_K_MAX", "KnnLmSettings", "evaluate_knn_lm", "figures", "format_table",
    "DEFAULT_EXACT_SAMPLE", "DEFAULT_TUNE_QUERIES", "Queries", "search_and_tune",
    "DEFAULT_MEMORY_BUDGET", "DEFAULT_RECALL", "EXACT_MAX_WORK", "INDEX_KINDS", "INDEX_VERSION", "KeySearch",
    "build_ivf", "choose_index_kind", "choose_settings", "exact_l2", "index_bytes", "open_key_search", "recall",
    "search_resumable",
    "FORMAT_VERSION", "STORE_DIR", "KnnStore", "open_or_build_queries", "open_or_build_store", "split_hidden_states",
    "store_identity",
    "LAMBDA_BINS", "LAMBDAS", "grid_losses", "interpolate", "interpolate_by_distance", "k_grid", "knn_logprobs",
    "temperature_scale", "tune", "tune_by_distance",
]
