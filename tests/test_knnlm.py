"""kNN-LM: the store of train hidden states, its search, the interpolation and honest tuning."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import make_datastore

from knnformer.eval.knnlm import (
    KeySearch,
    KnnStore,
    build_ivf,
    evaluate_knn_lm,
    exact_l2,
    interpolate,
    knn_logprobs,
    recall,
    tune,
)
from knnformer.eval.scoring import score_tokens
from knnformer.io import file_sha256
from knnformer.run.record import load_run, open_run_datastore
from knnformer.runtime import torch_threads
from knnformer.train.trainer import train


def train_tiny(run_dir, store, steps: int, *overrides: str, resume: bool = False):
    """The tiny preset trained ``steps`` steps on one thread (two threads crawl on a busy shared CPU)."""
    from knnformer.config import load_config

    config = load_config("tiny", [f"train.steps={steps}", "train.eval_interval=0",
                                  f"train.checkpoint_interval={steps}", *overrides])
    config.model.vocab_size = 256
    with torch_threads(1):
        train(run_dir, store, config, resume=resume)


def knn(run_dir, split="valid", **kwargs):
    return evaluate_knn_lm(run_dir, split, threads=1, **kwargs)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A plain tiny model trained a few steps on the tiny byte datastore."""
    tmp = tmp_path_factory.mktemp("knnlm")
    store = make_datastore(tmp, "bytes", num_docs=8)
    train_tiny(tmp / "run", store, 10)
    return tmp / "run", store


def scored_lm_loss(run_dir, lo: int, hi: int, neighbours=None) -> float:
    """evaluate.py's own per-token losses, averaged over the targets lo .. hi - 1 of valid."""
    model, record, _ = load_run(run_dir)
    store = open_run_datastore(record)
    tokens = store.split_tokens("valid")
    with torch_threads(1):
        out = score_tokens(model, tokens, store.tokenizer.token_bytes, per_token=True, neighbours=neighbours)
    return float(out["losses"][lo - 1 : hi - 1].astype(np.float64).mean())


def test_lambda_zero_is_the_lm_exactly(tiny_run):
    run_dir, _ = tiny_run
    r = knn(run_dir, "valid", lam=0.0, k=4, temperature=1.0)
    assert r["lambda"] == 0.0
    assert r["loss"] == r["lm"]["loss"] and r["bits_per_byte"] == r["lm"]["bits_per_byte"]
    lo, hi = r["scored_targets"]
    assert r["tokens"] == hi - lo
    assert r["loss"] == pytest.approx(scored_lm_loss(run_dir, lo, hi), abs=1e-6)


def test_interpolation_matches_a_hand_computation():
    D = np.array([[1.0, 2.0, 4.0], [0.5, 1.0, np.inf]])  # second query: only two keys found
    match = np.array([[True, False, True], [False, False, True]])
    T, lam, p_lm = 2.0, 0.25, np.array([0.1, 0.3])
    w = np.exp(-np.array([1.0, 2.0, 4.0]) / T)
    knn = knn_logprobs(D, match, T)
    assert float(knn[0, 2]) == pytest.approx(math.log((w[0] + w[2]) / w.sum()), abs=1e-12)
    assert float(knn[0, 1]) == pytest.approx(math.log(w[0] / w[:2].sum()), abs=1e-12)
    assert float(knn[0, 0]) == pytest.approx(0.0, abs=1e-12)  # k = 1, the nearest key matches
    assert float(knn[1, 2]) == -math.inf  # the only match was never found
    logp = interpolate(np.log(p_lm), knn[:, 2], lam)
    assert float(logp[0]) == pytest.approx(math.log(lam * (w[0] + w[2]) / w.sum() + (1 - lam) * 0.1), abs=1e-12)
    assert float(logp[1]) == pytest.approx(math.log((1 - lam) * 0.3), abs=1e-12)
    assert torch.equal(interpolate(np.log(p_lm), knn[:, 2], 0.0), torch.tensor(np.log(p_lm)))


def test_lambda_by_distance_trusts_close_neighbours_more_and_one_bin_is_plain_interpolation():
    from knnformer.eval.knnlm import interpolate, interpolate_by_distance, knn_logprobs, tune, tune_by_distance

    rng = np.random.default_rng(0)
    n, k = 4000, 8
    D = np.sort(rng.uniform(0, 1, (n, k)), axis=1)
    D[: n // 2] *= 0.01  # half the queries have close neighbours ...
    match = np.zeros((n, k), dtype=bool)
    match[: n // 2, :] = rng.uniform(size=(n // 2, k)) < 0.9  # ... whose values are nearly always the target
    match[n // 2 :, :] = rng.uniform(size=(n // 2, k)) < 0.05  # far ones rarely are
    logp_lm = np.full(n, np.log(0.3))
    tuned = tune(logp_lm, D, match)
    binned = tune_by_distance(logp_lm, D, match, tuned, [0.0, 0.2, 0.4, 0.6, 0.8], 2)
    assert binned["lambda"][0] > binned["lambda"][1]  # bin 0 = the close queries
    one = {"edges": [], "lambda": [0.4], "k": [4]}
    got = interpolate_by_distance(logp_lm, D, match, tuned["temperature"], one)
    want = interpolate(logp_lm, knn_logprobs(D, match, tuned["temperature"])[:, 3], 0.4)
    assert torch.equal(got, want)


def test_tune_finds_the_best_grid_point():
    rng = np.random.default_rng(0)
    D = np.sort(rng.random((200, 8)) * 4, axis=1)
    match = rng.random((200, 8)) < 0.5
    lm = np.log(rng.random(200) * 0.2 + 0.01)
    best = tune(lm, D, match, lambdas=(0.0, 0.3, 0.6), ks=[2, 8], temperatures=[0.5, 2.0])
    losses = {(lam, k, t): float(-interpolate(lm, knn_logprobs(D, match, t)[:, k - 1], lam).mean())
              for lam in (0.0, 0.3, 0.6) for k in (2, 8) for t in (0.5, 2.0)}
    assert best["loss"] == pytest.approx(min(losses.values()), abs=1e-12)
    assert losses[(best["lambda"], best["k"], best["temperature"])] == pytest.approx(best["loss"], abs=1e-12)


def test_tuning_never_looks_at_the_scored_tokens(tiny_run, tmp_path):
    run_dir, store = tiny_run
    r = knn(run_dir, "valid", k_max=16)
    (t_lo, t_hi), (s_lo, s_hi) = r["tuned_targets"], r["scored_targets"]
    assert r["tuned_on"] == "valid[:half]" and r["scored"] == "valid[half:]"
    assert t_lo == 1 and t_hi == s_lo == r["half"] and s_hi == len(store.split_tokens("valid"))
    # the same datastore with valid's second half scrambled: the tuning must not move, the score must
    changed = tmp_path / "changed"
    shutil.copytree(store.path, changed)
    tokens = np.memmap(changed / "tokens.bin", dtype=store.tokens.dtype, mode="r+")
    lo, _ = store.split_range("valid")
    half = r["half"]
    end = lo + len(store.split_tokens("valid"))
    tokens[lo + half : end] = np.random.default_rng(0).permutation(np.asarray(tokens[lo + half : end]))
    tokens.flush()
    manifest = json.loads((changed / "manifest.json").read_text())  # a datastore of its own: its tokens' sha256
    manifest["tokens_sha256"] = file_sha256(changed / "tokens.bin")
    (changed / "manifest.json").write_text(json.dumps(manifest))
    again = knn(run_dir, "valid", datastore=str(changed), k_max=16)
    assert again["store"]["reused"]  # same train split: same keys
    for key in ("lambda", "k", "temperature"):
        assert again[key] == r[key]
    assert again["tuning"] == r["tuning"]
    assert again["loss"] != r["loss"]


def test_store_is_reused_when_it_matches_and_rebuilt_when_the_checkpoint_changes(tmp_path):
    store = make_datastore(tmp_path, "bytes", num_docs=6)
    run = tmp_path / "run"
    train_tiny(run, store, 4)
    first = knn(run, k_max=8)
    assert not first["store"]["reused"] and first["step"] == 4
    keys = np.array(KnnStore.open(run / "knnlm").keys)
    manifest = json.loads((run / "knnlm" / "manifest.json").read_text())
    train_tokens = store.split_tokens("train")
    assert first["store"]["keys"] == len(train_tokens) - 1  # train positions only: no valid key to leak
    assert np.array_equal(KnnStore.open(run / "knnlm").values, np.asarray(train_tokens[1:]))
    second = knn(run, k_max=8)
    assert second["store"]["reused"] and second["loss"] == first["loss"]
    assert json.loads((run / "knnlm" / "manifest.json").read_text()) == manifest
    train_tiny(run, store, 8, resume=True)
    third = knn(run, k_max=8)
    assert not third["store"]["reused"] and third["step"] == 8
    rebuilt = json.loads((run / "knnlm" / "manifest.json").read_text())
    assert rebuilt["identity"]["checkpoint"]["step"] == 8
    assert rebuilt["identity"]["checkpoint"]["weights_sha256"] != manifest["identity"]["checkpoint"]["weights_sha256"]
    assert not np.array_equal(np.array(KnnStore.open(run / "knnlm").keys), keys)
    assert not list(run.glob(".knnlm*"))  # no temporary left behind


def test_test_split_is_tuned_on_valid(tmp_path):
    store = make_datastore(tmp_path, "bytes", num_docs=8, valid=0.25, test=0.25)
    train_tiny(tmp_path / "run", store, 2)
    r = knn(tmp_path / "run", "test", k_max=8)
    assert r["tuned_on"] == "valid" and r["scored"] == "test"
    assert r["tokens"] == len(store.split_tokens("test")) - 1
    assert r["tuning"]["tokens"] == len(store.split_tokens("valid")) - 1
    with pytest.raises(ValueError, match="train split"):
        knn(tmp_path / "run", "train")


def test_overlap_filtered_figures_come_with_the_datastores_chunk_neighbours(tmp_path):
    from knnformer.retrieval.build import index_datastore

    store = make_datastore(tmp_path, "bytes", num_docs=8)
    train_tiny(tmp_path / "run", store, 2)
    assert "filtered" not in knn(tmp_path / "run", k_max=8)  # no chunk neighbours: nothing to bucket by
    index_datastore(store.path, "bytes-hash", k=2, chunk_size=16, exclude_window=64)
    r = knn(tmp_path / "run", k_max=8)
    for fig in (r, r["lm"]):  # alpha 1 keeps every chunk: the unfiltered figure
        assert fig["filtered"]["1.0"]["fraction"] == 1.0
        assert fig["filtered"]["1.0"]["bits_per_byte"] == pytest.approx(fig["bits_per_byte"], rel=1e-9)
    low = r["filtered"]["0.125"]
    from knnformer.eval.knnlm import format_table
    assert "overlap <= 0.125" in format_table(r)
    assert 0 < low["fraction"] <= 1 and np.isfinite(low["bits_per_byte"])


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_approximate_search_against_exact(tmp_path, kind):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 16)) * 4
    xb = (centres[rng.integers(0, 50, 8_000)] + rng.normal(size=(8_000, 16))).astype(np.float16)
    xq = (centres[rng.integers(0, 50, 200)] + rng.normal(size=(200, 16))).astype(np.float32)
    (tmp_path / "keys.f16").write_bytes(xb.tobytes())
    np.save(tmp_path / "values.npy", np.zeros(len(xb), dtype=np.int32))
    (tmp_path / "manifest.json").write_text(json.dumps({"num_keys": len(xb), "dim": 16}))
    store = KnnStore.open(tmp_path)
    D, I = exact_l2(store.keys, xq, 10, block=3000)
    brute = ((xq[:, None, :] - xb.astype(np.float32)[None]) ** 2).sum(-1)
    assert np.array_equal(I, np.argsort(brute, axis=1, kind="stable")[:, :10]) or \
        np.allclose(D, np.sort(brute, axis=1)[:, :10], rtol=1e-4)
    index = build_ivf(store, kind)
    everything = KeySearch(store, kind, index, nprobe=index.nlist, refine=64)
    assert recall(everything, xq, 10, num_queries=100) >= (0.999 if kind == "ivf" else 0.95)
    d, i = everything.search(xq[:50], 10)
    assert np.allclose(d, np.take_along_axis(brute[:50], i, 1), rtol=1e-4)  # exact distances of what was found
    assert recall(KeySearch(store, kind, index, nprobe=8), xq, 10, num_queries=100) >= 0.8


def test_a_retrieval_model_reads_its_neighbours_for_keys_and_queries(tmp_path):
    """With retrieval on, p_lm and the hidden states are the retrieval model's: at lambda 0 the loss is
    evaluate's retrieval-on loss of the same tokens, and it differs from the same run with retrieval off."""
    from knnformer.retrieval.build import index_datastore
    from knnformer.run.batches import neighbour_inputs
    from knnformer.run.record import run_neighbours

    store = make_datastore(tmp_path, "bytes", num_docs=8)
    index_datastore(store.path, embedder="bytes-hash", index="flat", k=2, chunk_size=16, exclude_window=48)
    train_tiny(tmp_path / "run", store, 3, "retrieval.enabled=true")
    on = knn(tmp_path / "run", lam=0.0, k=4, temperature=1.0)
    off = knn(tmp_path / "run", lam=0.0, k=4, temperature=1.0, retrieval="off")
    assert on["retrieval"] == "on" and off["retrieval"] == "off"
    assert not off["store"]["reused"]  # keys computed without neighbours are another store
    _, record, _ = load_run(tmp_path / "run")
    neighbours = run_neighbours(record, store, required=True)
    k = record["config"]["retrieval"]["num_neighbours"]  # the run's K (the default's)

    def nb_fn(begins, length):
        nb, mask, _ = neighbour_inputs(neighbours, "valid", begins, length, k)
        return nb, mask

    lo, hi = on["scored_targets"]
    assert on["loss"] == pytest.approx(scored_lm_loss(tmp_path / "run", lo, hi, nb_fn), abs=1e-6)
    assert off["loss"] == pytest.approx(scored_lm_loss(tmp_path / "run", lo, hi), abs=1e-6)
    assert abs(on["loss"] - off["loss"]) > 1e-4


def test_a_learned_run_reads_its_refreshed_neighbours(tmp_path):
    """kNN-LM gives a learned run the neighbours of its last refresh, as evaluate does, not the datastore's."""
    from knnformer.retrieval.build import index_datastore
    from knnformer.retrieval.neighbours import load_neighbours
    from knnformer.run.batches import neighbour_inputs
    from knnformer.run.record import run_neighbours

    store = make_datastore(tmp_path, "bytes", num_docs=8)
    index_datastore(store.path, embedder="bytes-hash", index="flat", k=2, chunk_size=16, exclude_window=48)
    train_tiny(tmp_path / "run", store, 2, "retrieval.enabled=true", "retrieval.retriever=learned",
               "retrieval.retriever_init=scratch")
    _, record, _ = load_run(tmp_path / "run")
    refreshed = run_neighbours(record, store, required=True, run_dir=tmp_path / "run")
    assert refreshed.info["embedder"] == "learned"
    assert not np.array_equal(refreshed.ids, load_neighbours(store).ids)
    on = knn(tmp_path / "run", lam=0.0, k=4, temperature=1.0)
    manifest = json.loads((tmp_path / "run" / "knnlm" / "manifest.json").read_text())
    assert json.dumps(manifest).count("learned:refresh-1") >= 1

    k = record["config"]["retrieval"]["num_neighbours"]  # the run's K (the default's)

    def nb_fn(begins, length):
        nb, mask, _ = neighbour_inputs(refreshed, "valid", begins, length, k)
        return nb, mask

    lo, hi = on["scored_targets"]
    assert on["loss"] == pytest.approx(scored_lm_loss(tmp_path / "run", lo, hi, nb_fn), abs=1e-6)


def test_a_killed_store_build_resumes_and_a_smaller_store_is_the_prefix_of_a_larger(tmp_path, monkeypatch):
    """Keys are recorded as they are written: a build killed midway resumes where it stopped, and the store of the
    first N keys grows into the whole store with the same keys a build from nothing computes."""
    import knnformer.eval.knnlm.store as store_mod
    from knnformer.eval.knnlm import open_or_build_store, store_identity

    store = make_datastore(tmp_path, "bytes", num_docs=8)
    train_tiny(tmp_path / "run", store, 2)
    model, record, ckpt = load_run(tmp_path / "run")
    tokens = store.split_tokens("train")
    identity = store_identity(record, ckpt, store, None, "float32", model.config.context)
    with torch_threads(1):
        full, _ = open_or_build_store(tmp_path / "fresh", model, identity, tokens, batch_size=2)
        monkeypatch.setattr(store_mod, "CHECKPOINT_SECONDS", 0.0)
        seen = []

        def killed(n):
            seen.append(n)
            if sum(seen) > len(tokens) // 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            open_or_build_store(tmp_path / "run", model, identity, tokens, batch_size=2, progress=killed)
        partial = KnnStore.open(tmp_path / "run" / "knnlm")
        assert 0 < partial.num_keys < len(tokens) - 1 and not partial.complete
        counted = []
        small, reused = open_or_build_store(tmp_path / "run", model, identity, tokens, batch_size=2,
                                            progress=counted.append, max_keys=partial.num_keys // 2)
        assert reused and small.num_keys == partial.num_keys // 2 and counted == []  # a prefix: nothing computed
        grown, reused = open_or_build_store(tmp_path / "run", model, identity, tokens, batch_size=2,
                                            progress=counted.append)
    assert not reused and counted[0] == partial.num_keys  # resumed: the keys there were counted, not computed
    assert sum(counted) == len(tokens) - 1 and grown.complete
    assert np.allclose(np.asarray(grown.keys, np.float32), np.asarray(full.keys, np.float32), atol=2e-3)
    assert np.array_equal(np.asarray(small.keys), np.asarray(grown.keys[: small.num_keys]))


def test_a_killed_search_resumes_with_the_batches_it_wrote(tmp_path, monkeypatch):
    import knnformer.eval.knnlm.search as search_mod
    from knnformer.eval.knnlm import search_resumable

    rng = np.random.default_rng(1)
    xb = rng.normal(size=(3_000, 8)).astype(np.float16)
    xq = rng.normal(size=(500, 8)).astype(np.float32)
    (tmp_path / "keys.f16").write_bytes(xb.tobytes())
    np.save(tmp_path / "values.npy", np.zeros(len(xb), dtype=np.int32))
    (tmp_path / "manifest.json").write_text(json.dumps({"num_keys": len(xb), "dim": 8}))
    search = KeySearch(KnnStore.open(tmp_path), "exact")
    monkeypatch.setattr(search_mod, "CHECKPOINT_SECONDS", 0.0)
    calls = []

    def killed(n):
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search_resumable(search, xq, 5, tmp_path / "s", {"what": 1}, killed, batch_size=100)
    resumed = []
    D, I, reused = search_resumable(search, xq, 5, tmp_path / "s", {"what": 1}, resumed.append, batch_size=100)
    assert not reused and resumed[0] == 200 and sum(resumed) == 500  # two batches kept, three searched
    D0, I0 = search.search(xq, 5)
    assert np.array_equal(I, I0) and np.array_equal(D, D0)
    again = search_resumable(search, xq, 5, tmp_path / "s", {"what": 1}, None, batch_size=100)
    assert again[2] and np.array_equal(again[1], I0)
    changed = search_resumable(search, xq, 4, tmp_path / "s", {"what": 1}, None, batch_size=100)
    assert not changed[2] and np.array_equal(changed[1], I0[:, :4])  # another k: searched again


def test_nprobe_and_refine_are_chosen_to_reach_the_recall_target(tmp_path):
    from knnformer.eval.knnlm import choose_settings

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 16)) * 4
    xb = (centres[rng.integers(0, 50, 8_000)] + rng.normal(size=(8_000, 16))).astype(np.float16)
    xq = (centres[rng.integers(0, 50, 200)] + rng.normal(size=(200, 16))).astype(np.float32)
    (tmp_path / "keys.f16").write_bytes(xb.tobytes())
    np.save(tmp_path / "values.npy", np.zeros(len(xb), dtype=np.int32))
    (tmp_path / "manifest.json").write_text(json.dumps({"num_keys": len(xb), "dim": 16}))
    store = KnnStore.open(tmp_path)
    exact_I = exact_l2(store.keys, xq, 32)[1]
    search = KeySearch(store, "ivfpq", build_ivf(store, "ivfpq"))
    for target in (0.8, 0.97):
        choice = choose_settings(search, xq, exact_I, 16, target)
        assert choice["recall"] >= target and (search.nprobe, search.refine) == (choice["nprobe"], choice["refine"])
        found = search.search(xq, 16)[1]
        hits = sum(len(np.intersect1d(a, e)) for a, e in zip(found, exact_I[:, :16]))
        assert hits / exact_I[:, :16].size == pytest.approx(choice["recall"], abs=1e-4)
    assert [t for t in choice["tried"] if t["recall"] < 0.97]  # cheaper settings were tried and fell short


def test_an_approximate_evaluation_is_checked_against_exact_and_resumes_its_searches(tiny_run, tmp_path):
    """ivfpq on the tiny store: recall-chosen settings, the gain on the exact sample beside the exact gain, a
    second evaluation reuses every search; a memory budget the index cannot fit is refused with a clear message."""
    run_dir, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    r = knn(run, k_max=16, index="ivfpq", exact_sample=200, tune_queries=2_000, recall_target=0.95)
    c = r["sample_check"]
    assert r["index"]["kind"] == "ivfpq" and r["index"]["recall_at_k"] >= 0.9
    assert r["index"]["settings_for_scoring"]["recall"] >= 0.95
    assert c["queries"] == 200 and c["gain_vs_exact"] is not None
    assert abs(c["gain_bits_per_byte"] - c["exact_gain_bits_per_byte"]) <= 0.1 * abs(c["exact_gain_bits_per_byte"])
    assert r["tuning"]["tokens"] == 2_000 and r["index"]["k_searched"] <= 16
    again = knn(run, k_max=16, index="ivfpq", exact_sample=200, tune_queries=2_000, recall_target=0.95)
    assert again["index"]["scored_search_reused"] and again["index"]["reused"]
    assert again["loss"] == r["loss"] and again["tuning"] == r["tuning"]
    with pytest.raises(ValueError, match="memory-budget"):
        knn(run, k_max=16, index="ivfpq", memory_budget=1 << 10)


def test_the_cli_shows_knn_lm_progress_on_stderr_even_with_json(tiny_run, tmp_path, capsys):
    from knnformer.cli import main

    run_dir, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["evaluate", str(run), "--knn-lm", "--json", "--knn-k-max", "8"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["k"] <= 8
    for stage in ("kNN-LM keys", "kNN-LM queries (valid)", "kNN-LM search (tuning", "kNN-LM tuning",
                  "kNN-LM search (scored"):
        assert stage in err
    assert main(["evaluate", str(run), "--knn-lm", "--memory-budget", "0.000001", "--knn-index", "ivfpq"]) == 2
    assert "memory-budget" in capsys.readouterr().err


def test_a_large_store_assigns_keys_through_an_hnsw_graph_of_centroids(tmp_path, monkeypatch):
    """From HNSW_QUANTIZER_MIN_LISTS lists on, the coarse quantizer is a graph; read back from disk it still
    searches as many lists as nprobe asks (the graph's efSearch follows nprobe)."""
    import knnformer.eval.knnlm.search as search_mod
    from knnformer.eval.knnlm import open_key_search

    monkeypatch.setattr(search_mod, "HNSW_QUANTIZER_MIN_LISTS", 1)
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(20_000, 16)).astype(np.float16)
    xq = rng.normal(size=(100, 16)).astype(np.float32)
    (tmp_path / "keys.f16").write_bytes(xb.tobytes())
    np.save(tmp_path / "values.npy", np.zeros(len(xb), dtype=np.int32))
    (tmp_path / "manifest.json").write_text(json.dumps({"num_keys": len(xb), "dim": 16}))
    built, info = open_key_search(KnnStore.open(tmp_path), "ivfpq", nprobe=8)
    import faiss

    assert not info["reused"] and hasattr(faiss.downcast_index(built.index.quantizer), "hnsw")
    read, info = open_key_search(KnnStore.open(tmp_path), "ivfpq", nprobe=built.index.nlist, refine=16)
    assert info["reused"]
    assert recall(read, xq, 10, num_queries=100) >= 0.95  # every list searched: only PQ's error is left


def test_the_compiled_forward_writes_the_keys_eager_writes_and_a_failed_compile_falls_back(tiny_run, monkeypatch,
                                                                                          caplog):
    """``split_hidden_states(compile=True)`` runs full batches through ``torch.compile`` and the split's shorter
    last windows eagerly; its keys (fp16, converted by torch) equal the eager pass's, and so do its log-probs.
    A compile that raises is logged and the pass goes on eagerly with the same result."""
    import knnformer.eval.knnlm.store as store_mod

    run_dir, store = tiny_run
    model, _, _ = load_run(run_dir)
    tokens = store.split_tokens("valid")
    n = len(tokens) - 1
    assert n % model.config.context != 0  # a shorter last window: the eager path is exercised too
    with torch_threads(1):
        eager = np.zeros((n, model.config.dim), np.float16)
        lp_eager = store_mod.split_hidden_states(model, tokens, eager, 4, logprobs=True, compile=False)
        compiled = np.zeros_like(eager)
        lp_compiled = store_mod.split_hidden_states(model, tokens, compiled, 4, logprobs=True, compile=True)
        assert np.isfinite(compiled.astype(np.float32)).all() and np.abs(compiled.astype(np.float32)).sum() > 0
        assert np.allclose(compiled.astype(np.float32), eager.astype(np.float32), atol=2e-3)
        assert np.allclose(lp_compiled, lp_eager, atol=1e-4)

        def broken(fn, **kwargs):
            def call(*args, **kw):
                raise RuntimeError("no C++ compiler here")
            return call

        monkeypatch.setattr(store_mod.torch, "compile", broken)
        fallback = np.zeros_like(eager)
        with caplog.at_level("WARNING"):
            store_mod.split_hidden_states(model, tokens, fallback, 4, compile=True)
    assert "continuing eagerly" in caplog.text and "no C++ compiler here" in caplog.text
    assert np.array_equal(fallback, eager)


def test_keys_and_queries_are_computed_in_batches_of_about_2048_positions_unless_told():
    """Without --batch-size the store's forward passes batch FORWARD_POSITIONS positions (measured fastest), at
    least one window; a batch size below 1 is refused before anything is loaded."""
    from knnformer.eval.knnlm.evaluate import FORWARD_POSITIONS, KnnLmSettings, forward_batch

    assert FORWARD_POSITIONS == 2048
    assert [forward_batch(c) for c in (64, 256, 1024, 4096)] == [32, 8, 2, 1]
    KnnLmSettings().check()
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        KnnLmSettings(batch_size=0).check()


def test_a_large_store_gets_more_shorter_lists_trained_through_the_graph():
    """``ivf_lists``: below HNSW_QUANTIZER_MIN_LISTS lists (at 2 per sqrt(keys)), a flat quantizer with 2 lists
    per sqrt(keys) and 40 training keys a list; above, a graph of centroids and 4 lists per sqrt(keys) with 16
    training keys a list; ``index_bytes`` counts the lists ``build_ivf`` makes."""
    from knnformer.eval.knnlm.search import index_bytes, ivf_lists

    assert ivf_lists(1_000_000) == (2000, 40, False)
    assert ivf_lists(3_000_000) == (4 * 1732, 16, True)
    assert ivf_lists(13_000_000) == (4 * 3605, 16, True)
    lists = 4 * 1732 * 384 * 4 * 2 + 4 * 1732 * 32 * 8  # centroids, and their copy in the graph with its links
    assert index_bytes("ivf", 3_000_000, 384) == 3_000_000 * (2 * 384 + 8) + lists
