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


def test_index_with_shards_gives_the_single_index_neighbours_and_every_reader_opens_it(tmp_path, capsys):
    """``knnformer index --shards 3`` writes ``index.shards/`` (in the manifest); its neighbours and the live
    retriever's results equal a one-file build's, verify reads it, and a later one-file build removes it."""
    import shutil

    from knnformer.cli import main
    from knnformer.data.chunks import read_retrieval_manifest
    from knnformer.retrieval.live import open_index, open_retriever
    from knnformer.retrieval.neighbours import load_neighbours
    from knnformer.run.verify import verify_datastore
    from tests.conftest import make_datastore

    one = make_datastore(tmp_path / "a").path
    three = tmp_path / "b"
    shutil.copytree(one, three)
    args = ["--quiet", "index", "--embedder", "bytes-hash", "--index", "flat", "--k", "4", "--chunk-size", "16",
            "--exclude-window", "32"]
    assert main([*args, str(one)]) == 0
    assert main([*args, str(three), "--shards", "3"]) == 0
    info = read_retrieval_manifest(three)["index"]
    assert info["shards"] == 3 and info["file"] == "index.shards" and not (three / "index.faiss").exists()
    assert "shards" not in read_retrieval_manifest(one)["index"]
    sharded = open_index(Datastore_open(three))
    assert isinstance(sharded, ShardedIndex) and len(sharded.shards) == 3
    a, b = load_neighbours(Datastore_open(one)), load_neighbours(Datastore_open(three))
    assert_same_up_to_ties(np.asarray(a.ids), np.asarray(a.scores, np.float32), np.asarray(b.ids),
                           np.asarray(b.scores, np.float32))
    texts = ["the corpus is its memory", "every chunk it retrieves", "café naïve where knowledge came"]
    ra, rb = open_retriever(one).search(texts, 5), open_retriever(three).search(texts, 5)
    assert_same_up_to_ties(ra.I, ra.D, rb.I, rb.D)
    assert all(ok for ok, _ in verify_datastore(three))
    assert main([*args, str(three), "--shards", "2", "--no-neighbours"]) == 0  # an index alone (a database)
    assert read_retrieval_manifest(three)["index"]["shards"] == 2 and len(open_index(Datastore_open(three)).shards) == 2
    rc = open_retriever(three).search(texts, 5)
    assert_same_up_to_ties(ra.I, ra.D, rc.I, rc.D)
    assert main([*args, str(three), "--force"]) == 0  # back to one file: the shards go
    assert not (three / "index.shards").exists() and (three / "index.faiss").is_file()
    with pytest.raises(ValueError, match="bm25"):
        from knnformer.retrieval.build import index_datastore
        index_datastore(three, embedder="bm25", shards=2)


def assert_same_up_to_ties(I1, D1, I2, D2, tol=1e-5):
    """The same scores at every rank, and the same ids wherever the score is not tied: bytes-hash vectors are
    n-gram counts whose inner products tie often, and faiss orders equal scores in no documented way."""
    assert np.allclose(D1, D2, atol=tol)
    for i1, d1, i2, d2 in zip(I1, D1, I2, D2):
        for score in np.unique(d1):
            same = np.abs(d1 - score) <= tol
            if score > d1[-1] + tol:  # a whole tie group inside the top k: the same ids, in any order
                assert set(i1[same]) == set(i2[np.abs(d2 - score) <= tol])
    untied = np.array([np.sum(np.abs(d - d[j]) <= tol) == 1 for d in D1 for j in range(len(d))]).reshape(D1.shape)
    untied &= D1 > D1[:, -1:] + tol  # the k-th score may tie with a chunk beyond k
    assert untied.mean() > 0.3 and np.array_equal(I1[untied], I2[untied])


def Datastore_open(path):
    from knnformer.data.datastore import Datastore

    return Datastore.open(path)
