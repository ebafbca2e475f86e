"""An index written as shards and searched with a merge by score gives the single index's neighbours."""

from __future__ import annotations

import numpy as np
import pytest

from knnformer.retrieval.index import build_dense_index
from knnformer.retrieval.shards import ShardedIndex, build_shards, shard_ranges


def test_sharded_exact_search_equals_one_index(tmp_path):
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((1000, 32)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(1000, 50, replace=False)] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    single = build_dense_index(xb, "flat").search(xq, 10)
    sharded = ShardedIndex(build_shards(xb, "flat", 3, tmp_path / "idx"))
    found = sharded.search(xq, 10)
    assert sharded.ntotal == 1000 and len(sharded.shards) == 3
    assert np.array_equal(found.I, single.I)
    assert np.allclose(found.D, single.D, atol=1e-5)


def test_shard_ranges_cover_everything():
    assert shard_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError, match="positive"):
        shard_ranges(10, 0)
