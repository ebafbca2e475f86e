"""An index that follows the model: the refresh schedule, refreshes that change neighbours exactly when the
retriever changes, the recall floor, and resume across a refresh."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from knnformer.config import load_config, parse_schedule, resolved_lag
from knnformer.data.corpus import Document
from knnformer.data.datastore import Datastore, write_datastore
from knnformer.data.tokenizer import ByteTokenizer
from knnformer.eval.evaluate import evaluate_run
from knnformer.model.transformer import Transformer
from knnformer.retrieval.build import index_datastore
from knnformer.retrieval.index import exact_search
from knnformer.retrieval.neighbours import load_neighbours
from knnformer.run.checkpoint import latest_checkpoint, list_checkpoints
from knnformer.run.refreshes import load_refresh
from knnformer.run.vectors import embed_all_chunks
from knnformer.train.refresh import BackgroundRefresh, refresh_due, refresh_neighbours
from knnformer.train.trainer import train

C = 16


def line_store(tmp_path, num_docs: int = 40) -> Datastore:
    rng = random.Random(0)
    pool = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(63)) + "\n" for _ in range(30)]
    docs = [Document(f"doc{i:03d}", "".join(rng.choice(pool) for _ in range(6)), "train") for i in range(num_docs)]
    docs += [Document(f"val{i:03d}", "".join(rng.choice(pool) for _ in range(6)), "valid") for i in range(4)]
    write_datastore(tmp_path / "store", docs, ByteTokenizer(), [])
    index_datastore(tmp_path / "store", embedder="bytes-hash", index="flat", k=4, chunk_size=C, exclude_window=128)
    return Datastore.open(tmp_path / "store")


def learned_config(*overrides):
    config = load_config("tiny", ["model.context=64", "retrieval.enabled=true", "retrieval.chunk_size=16",
                                  "retrieval.retriever=learned", *overrides])
    config.model.vocab_size = 256
    return config


def test_schedule_is_data():
    schedule = parse_schedule("0-1000:250,1000-:1000")
    assert schedule == [(0, 1000, 250), (1000, None, 1000)]
    due = [s for s in range(0, 3001) if refresh_due(s, schedule)]
    assert due == [0, 250, 500, 750, 1000, 2000, 3000]
    assert parse_schedule("") == [] and not refresh_due(5, [])
    assert [s for s in range(20) if refresh_due(s, parse_schedule("5-12:3"))] == [5, 8, 11]
    for bad, match in [("0-100", "cannot read"), ("a-b:3", "cannot read"), ("10-5:2", "start < end"),
                       ("0-10:0", "every > 0"), ("0-:5,10-:5", "overlaps"), ("0-20:5,10-30:5", "overlaps")]:
        with pytest.raises(ValueError, match=match):
            parse_schedule(bad)
    with pytest.raises(ValueError, match="retriever.kind=learned"):
        load_config("tiny", ["retrieval.enabled=true", "retrieval.refresh=0-:10"])
    with pytest.raises(ValueError, match="retrieval.refresh"):
        load_config("tiny", ["retrieval.enabled=true", "retrieval.retriever=learned", "retrieval.refresh=0-:x"])


def test_refresh_changes_neighbours_iff_the_retriever_changes(tmp_path):
    store = line_store(tmp_path)
    base = load_neighbours(store)
    config = learned_config()
    config.retrieval.chunk_size = C
    torch.manual_seed(0)
    model = Transformer(config.model, config.retrieval)
    first = refresh_neighbours(model, base, tmp_path / "run", 1, 0)
    again = refresh_neighbours(model, base, tmp_path / "run", 2, 0)
    assert np.array_equal(first.ids, again.ids) and np.array_equal(first.scores, again.scores)
    assert not np.array_equal(first.ids, base.ids)  # the learned retriever is not bytes-hash
    with torch.no_grad():
        model.retrieval.retriever.proj.weight.copy_(torch.randn_like(model.retrieval.retriever.proj.weight))
    changed = refresh_neighbours(model, base, tmp_path / "run", 3, 0)
    assert (np.asarray(changed.ids) != np.asarray(first.ids)).any(1).mean() > 0.02  # repeated lines: many stay
    # the leakage rules of the datastore's neighbours hold: no train chunk retrieves its own document
    layout = changed.layout
    ids = np.asarray(changed.ids)[: layout.num_train]
    own = layout.doc_first[np.arange(layout.num_train)][:, None]
    assert not np.any((ids >= 0) & (layout.doc_first[np.maximum(ids, 0)] == own))
    # valid chunks get the exact top k over the train chunks' vectors
    vectors = np.asarray(changed.vectors, dtype=np.float32)
    lo, hi = layout.split_chunks["valid"]
    exact = exact_search(vectors[: layout.num_train], vectors[lo:hi], changed.k).D
    # (compared by score: repeated lines make many exact ties, whose order is arbitrary)
    np.testing.assert_allclose(np.asarray(changed.scores, dtype=np.float32)[lo:hi], exact, atol=2e-3)
    reloaded = load_refresh(tmp_path / "run" / "refresh" / "refresh-0003", store, layout)
    assert np.array_equal(reloaded.ids, changed.ids) and reloaded.info["refresh"] == 3


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_refreshed_index_recall_stays_above_the_floor(tmp_path, kind):
    store = line_store(tmp_path)
    base = load_neighbours(store)
    config = learned_config()
    config.retrieval.chunk_size = C
    torch.manual_seed(0)
    model = Transformer(config.model, config.retrieval)
    floor = 0.97
    nb = refresh_neighbours(model, base, tmp_path / "run", 1, 0, index=kind, recall_floor=floor)
    assert nb.info["recall_at_10"] >= floor
    assert nb.info["index_kind"] in (kind, "flat")
    strict = refresh_neighbours(model, base, tmp_path / "run", 2, 0, index="ivfpq", recall_floor=1.0)
    assert strict.info["index_kind"] == "flat" and strict.info["recall_at_10"] == 1.0


def test_a_refresh_searches_its_hnsw_index_as_wide_as_configured_and_records_it(tmp_path):
    from knnformer.retrieval.index import build_dense_index

    store = line_store(tmp_path)
    config = learned_config()
    torch.manual_seed(0)
    model = Transformer(config.model, config.retrieval)
    narrow = refresh_neighbours(model, load_neighbours(store), tmp_path / "run", 1, 0, index="hnsw", ef_search=1)
    wide = refresh_neighbours(model, load_neighbours(store), tmp_path / "run", 2, 0, index="hnsw", ef_search=512)
    assert (narrow.info["ef_search"], wide.info["ef_search"]) == (1, 512)  # (recall: ties blur it on this corpus)
    index = build_dense_index(np.asarray(wide.vectors[: wide.layout.num_train], np.float32), "hnsw")
    index.ef_search = 5
    q = np.asarray(wide.vectors[:4], np.float32)
    index.search(q, 3)
    assert index.index.hnsw.efSearch == 5
    index.search(q, 20)
    assert index.index.hnsw.efSearch == 20  # never narrower than k
    with pytest.raises(ValueError, match="refresh.ef_search"):
        learned_config("retrieval.refresh_ef_search=0")


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def resumable_run(tmp_path, store, steps: int, checkpoint_every: int, refresh: str, lag: int):
    """A learned run from scratch with dropout (so resume must restore the RNG too), every step logged; trains it
    into tmp_path / "full" and returns its config and metrics rows."""
    config = learned_config(f"train.steps={steps}", f"train.checkpoint_interval={checkpoint_every}",
                            "train.log_interval=1", "train.eval_interval=0", "train.keep_checkpoints=9",
                            "model.dropout=0.1", f"retrieval.refresh={refresh}", "retrieval.retriever_init=scratch",
                            f"retrieval.refresh_lag={lag}")
    train(tmp_path / "full", store, config)
    return config, [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_refresh_reproduces_losses(tmp_path):
    store = line_store(tmp_path)
    config, rows = resumable_run(tmp_path, store, 9, 4, "0-:3", 0)
    assert [r["step"] for r in rows if "refresh" in r] == [1, 4, 7]  # before steps 0, 3 and 6 (0-based)
    assert all(r["refresh_seconds"] > 0 and r["refresh_recall"] >= 0.9 for r in rows if "refresh" in r)
    config.train.steps = 6  # checkpoints at 4 and 6; step 6 dropped, so resume from 4 redoes the refresh at 6
    train(tmp_path / "part", store, config)
    shutil.rmtree(latest_checkpoint(tmp_path / "part"))
    config.train.steps = 9
    train(tmp_path / "part", store, config, resume=True)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    record = json.loads((latest_checkpoint(tmp_path / "full") / "config.json").read_text())
    assert record["refresh"] == {"id": 3, "step": 6, "folder": "refresh/refresh-0003"}
    result = evaluate_run(tmp_path / "full", "valid")
    assert result["neighbours"]["embedder"] == "learned"
    # recall after each refresh, read back from the refresh manifests
    assert [(r["refresh"], r["step"]) for r in result["refreshes"]] == [(1, 0), (2, 3), (3, 6)]
    assert all(r["recall_at_10"] == next(x for x in rows if x.get("refresh") == r["refresh"])["refresh_recall"]
               for r in result["refreshes"])
    gain = result["neighbour_gain"]
    assert gain["embedder"] == "learned" and gain["pairs"] > 0 and 0.0 <= gain["share_helped"] <= 1.0


def test_inspect_shows_a_chunk_with_its_neighbours_before_and_after_refreshes(tmp_path, capsys):
    from knnformer.cli import main

    store = line_store(tmp_path)
    config = learned_config("train.steps=2", "train.checkpoint_interval=2", "train.eval_interval=0",
                            "retrieval.retriever_init=scratch")
    train(tmp_path / "run", store, config)
    assert main(["-q", "inspect", str(tmp_path / "run"), "--chunk", "3", "--split", "valid", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    nb = load_refresh(tmp_path / "run" / "refresh" / "refresh-0001", store, load_neighbours(store).layout)
    cid = nb.layout.split_chunks["valid"][0] + 3
    assert out["chunk_id"] == cid and out["refresh"] == 1 and out["embedder"] == "learned"
    assert [r["chunk_id"] for r in out["current"]] == [int(i) for i in nb.ids[cid]]
    assert [r["chunk_id"] for r in out["initial"]] == [int(i) for i in load_neighbours(store).ids[cid]]
    assert out["initial_embedder"] == "bytes-hash" and all(r["split"] == "train" for r in out["current"])
    assert main(["-q", "inspect", str(tmp_path / "run"), "--chunk", "3"]) == 0
    assert "neighbours before training (bytes-hash)" in capsys.readouterr().out
    assert main(["-q", "inspect", str(tmp_path / "run"), "--chunk", "100000"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_generation_of_a_learned_run_searches_its_last_refresh(tmp_path, capsys):
    """Live retrieval embeds the text with the run's learned retriever and searches its refreshed vectors: a
    valid chunk's text finds exactly the neighbours the refresh stored for that chunk."""
    from knnformer.cli import main
    from knnformer.run.record import load_run, open_run_retriever

    store = line_store(tmp_path)
    config = learned_config("train.steps=2", "train.checkpoint_interval=2", "train.eval_interval=0",
                            "retrieval.retriever_init=scratch")
    train(tmp_path / "run", store, config)
    model, record, _ = load_run(tmp_path / "run")
    retriever = open_run_retriever(model, store, tmp_path / "run", record)
    refreshed = load_refresh(tmp_path / "run" / "refresh" / "refresh-0001", store, load_neighbours(store).layout)
    lo, _ = refreshed.layout.split_chunks["valid"]
    texts = [store.tokenizer.decode(store.tokens[refreshed.layout.starts[c] : refreshed.layout.ends[c]])
             for c in range(lo, lo + 6)]
    found = retriever.neighbours(texts, refreshed.k)
    # the query: the model's current retriever on the chunk's tokens; the keys: the refresh's train vectors
    layout = refreshed.layout
    q = embed_all_chunks(model, store.tokens, layout.starts[lo : lo + 6], layout.ends[lo : lo + 6])
    exact = exact_search(np.asarray(refreshed.vectors[: layout.num_train], np.float32), q, refreshed.k)
    # compared by score: repeated lines make exact ties, whose order is arbitrary
    np.testing.assert_allclose(found.scores, exact.D, atol=1e-5)
    assert found.scores.min() > 0.9 and not np.allclose(found.scores, 1.0)  # trained since the refresh
    prompt = store.tokenizer.decode(store.split_tokens("valid")[:40])
    assert main(["-q", "generate", str(tmp_path / "run"), "--prompt", prompt, "--max-new-tokens", "20",
                 "--seed", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_source = {c["retrieved_with_chunk"]: c for c in out["chunks"]}
    k = record["config"]["retrieval"]["num_neighbours"]  # generation serves the run's K (the default's)
    assert [n["score"] for n in by_source[1]["neighbours"]] == pytest.approx(exact.D[1][:k].tolist(), abs=1e-5)


def test_refresh_lag_is_checked_against_the_schedule():
    assert resolved_lag(-1, parse_schedule("0-1000:250,1000-:1000")) == 125
    assert resolved_lag(0, parse_schedule("0-:10")) == 0 and resolved_lag(9, parse_schedule("0-:10")) == 9
    with pytest.raises(ValueError, match="shorter than the shortest refresh interval"):
        load_config("tiny", ["retrieval.enabled=true", "retrieval.retriever=learned", "retrieval.refresh=0-:10",
                             "retrieval.refresh_lag=10"])
    with pytest.raises(ValueError, match="refresh.lag must be >= 0"):
        resolved_lag(-2, parse_schedule("0-:10"))


def test_background_refresh_swaps_in_at_a_fixed_step_and_resume_mid_flight_reproduces_losses(tmp_path):
    """A refresh started before step s runs on a thread and is swapped in before step s + lag, whatever its
    speed; checkpoints taken while it is in flight record it, and resuming from them gives the same losses."""
    store = line_store(tmp_path)
    config, rows = resumable_run(tmp_path, store, 11, 3, "0-:4", 2)
    events = [(r["step"], r["refresh"], r["refresh_started"]) for r in rows if "refresh" in r]
    assert events == [(1, 1, 0), (7, 2, 4), (11, 3, 8)]  # step 0 in line; 4 and 8 swapped in before 6 and 10
    assert all(r["refresh_cpu_seconds"] > 0 and r["refresh_seconds"] >= 0 for r in rows if "refresh" in r)
    # the checkpoints at 6 and 9 were taken with a refresh in flight: they name it
    ckpts = {int(c.name.split("-")[1]): json.loads((c / "config.json").read_text())
             for c in list_checkpoints(tmp_path / "full")}
    assert ckpts[6]["refresh_pending"] == {"id": 2, "step": 4, "swap_step": 6, "folder": "refresh/refresh-0002"}
    assert ckpts[6]["refresh"]["id"] == 1 and ckpts[9]["refresh_pending"]["id"] == 3
    assert "refresh_pending" not in ckpts[11] and ckpts[11]["refresh"] == {"id": 3, "step": 8,
                                                                           "folder": "refresh/refresh-0003"}
    for resume_from in (6, 9):
        part = tmp_path / f"from-{resume_from}"
        shutil.copytree(tmp_path / "full", part)
        for c in list_checkpoints(part):
            if int(c.name.split("-")[1]) > resume_from:
                shutil.rmtree(c)
        train(part, store, config, resume=True)
        assert losses(part) == losses(tmp_path / "full"), resume_from


def test_a_failed_background_refresh_is_raised_in_the_training_thread(tmp_path, monkeypatch):
    import knnformer.train.refresh as refresh

    store = line_store(tmp_path)
    config = learned_config("retrieval.refresh=0-:4")
    model = Transformer(config.model, config.retrieval)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(refresh, "refresh_neighbours", broken)
    job = BackgroundRefresh(model, config.retrieval, load_neighbours(store), tmp_path / "run", 1, 4, 6)
    with pytest.raises(RuntimeError, match="refresh 1 .*failed: disk full"):
        job.result()


def test_refreshes_no_checkpoint_reads_give_back_their_arrays_but_keep_their_manifests(tmp_path):
    store = line_store(tmp_path)
    config = learned_config("train.steps=10", "train.checkpoint_interval=2", "train.keep_checkpoints=1",
                            "train.eval_interval=0", "retrieval.refresh=0-:2", "retrieval.retriever_init=scratch",
                            "retrieval.refresh_lag=1")
    train(tmp_path / "run", store, config)
    folders = sorted((tmp_path / "run" / "refresh").glob("refresh-*"))
    assert [f.name for f in folders] == [f"refresh-{i:04d}" for i in range(1, 6)]  # before 0, 2, 4, 6 and 8
    assert all((f / "manifest.json").is_file() for f in folders)
    with_arrays = [f.name for f in folders if list(f.glob("*.npy"))]
    assert with_arrays == ["refresh-0005"]  # the one the last (only kept) checkpoint trained with
    result = evaluate_run(tmp_path / "run", "valid")
    assert [r["refresh"] for r in result["refreshes"]] == [1, 2, 3, 4, 5]


def test_a_retriever_reading_the_frozen_embedder_trains_refreshes_evaluates_and_generates(tmp_path, capsys):
    """retriever_input=embedder: before training, a refresh (identity projection) finds exactly the datastore's
    neighbours; after training with background refreshes, evaluate and generate read the run's own neighbours."""
    from knnformer.cli import main
    from knnformer.run.batches import neighbour_inputs, relevance_vectors

    store = line_store(tmp_path)
    base = load_neighbours(store)
    config = learned_config("retrieval.retriever_input=embedder", "retrieval.refresh=0-:4", "train.steps=10",
                            "train.eval_interval=5", "train.checkpoint_interval=10", "retrieval.refresh_lag=2")
    torch.manual_seed(0)
    untrained = Transformer(config.model, config.retrieval, base.vectors.shape[1])
    same = refresh_neighbours(untrained, base, tmp_path / "fresh", 1, 0, index="flat", frozen=base.vectors)
    differ = np.asarray(same.ids) != np.asarray(base.ids)  # only among exact ties (this corpus repeats lines)
    assert np.allclose(np.asarray(same.scores, np.float32), np.asarray(base.scores, np.float32), atol=2e-3)
    assert differ.mean() < 0.1
    # the vectors a batch hands the model: slot s's query chunk and its neighbours, rows of the stored vectors
    starts = np.array([0, 2 * C])
    _, _, ids = neighbour_inputs(base, "train", starts, 64, 2)
    q, z = relevance_vectors(base.vectors, base, "train", starts, 64, ids)
    assert torch.allclose(q[1, 1], torch.from_numpy(np.asarray(base.vectors[2], np.float32)))  # window chunk 0
    assert torch.all(q[0, 0] == 0)  # before the split's first chunk: none
    assert torch.allclose(z[1, 1, 0], torch.from_numpy(np.asarray(base.vectors[ids[1, 1, 0]], np.float32)))

    train(tmp_path / "run", store, config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["refresh"], r["refresh_started"]) for r in rows if "refresh" in r] == [(1, 4)]
    record = json.loads((latest_checkpoint(tmp_path / "run") / "config.json").read_text())
    assert record["derived"]["retriever_input_dim"] == base.vectors.shape[1]
    result = evaluate_run(tmp_path / "run", "valid")
    assert result["neighbours"]["embedder"] == "learned" and result["neighbour_gain"]["pairs"] > 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "abc def ghi jkl mno pqr", "--max-new-tokens", "40",
                 "--seed", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chunks"]


def test_a_retriever_reading_the_embedder_refuses_bm25_neighbours(tmp_path):
    store = line_store(tmp_path)
    index_datastore(store.path, embedder="bm25", k=4, chunk_size=C, exclude_window=128, force=True)
    config = learned_config("retrieval.retriever_input=embedder", "train.steps=2")
    with pytest.raises(ValueError, match="bm25 is not an embedding"):
        train(tmp_path / "run", Datastore.open(store.path), config)


def test_the_retriever_learns_at_its_own_rate_without_weight_decay(tmp_path):
    from knnformer.run.checkpoint import load_checkpoint
    from knnformer.train.optim import make_optimizer

    store = line_store(tmp_path)
    config = learned_config("train.steps=3", "train.eval_interval=0", "retrieval.retriever_lr_scale=0")
    torch.manual_seed(config.train.seed)  # as train initialises
    model = Transformer(config.model, config.retrieval)
    groups = make_optimizer(model, config.train, 0.25).param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 0.25] and groups[2]["weight_decay"] == 0.0
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in model.retrieval.retriever.parameters()}
    train(tmp_path / "run", store, config)  # scale 0: the retriever stays as initialised, the rest learns
    weights = load_checkpoint(latest_checkpoint(tmp_path / "run"))["weights"]
    assert torch.equal(weights["retrieval.retriever.proj.weight"], torch.eye(config.model.dim))
    assert not torch.equal(weights["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"])


def test_a_rerank_refresh_reorders_the_datastore_candidates_by_the_new_vectors(tmp_path):
    store = line_store(tmp_path)
    base = load_neighbours(store)
    config = learned_config()
    torch.manual_seed(0)
    model = Transformer(config.model, config.retrieval)
    nb = refresh_neighbours(model, base, tmp_path / "run", 1, 0, mode="rerank")
    ids, cand = np.asarray(nb.ids), np.asarray(base.ids)
    assert np.array_equal(np.sort(ids, 1), np.sort(cand, 1))  # the same candidates: leakage-safe as they were
    v = np.asarray(nb.vectors, np.float32)
    scores = np.einsum("nd,nkd->nk", v, v[ids])
    assert np.all(np.diff(scores, axis=1) <= 1e-3)  # nearest first under the retriever's own vectors
    assert np.allclose(scores, np.asarray(nb.scores, np.float32), atol=2e-3)
    assert nb.info["refresh_mode"] == "rerank" and nb.info["index_kind"] == "rerank"
    assert 0.0 <= nb.info["recall_at_10"] <= 1.0 and nb.info["recall_queries"] > 0
    with pytest.raises(ValueError, match="rerank"):
        learned_config("retrieval.refresh_mode=rerank", "retrieval.hops=2")
    config = learned_config("retrieval.refresh_mode=rerank", "retrieval.refresh=0-:3", "retrieval.refresh_lag=1",
                            "train.steps=6", "train.eval_interval=0")
    train(tmp_path / "trained", store, config)
    rows = [json.loads(line) for line in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
    assert [r["refresh_started"] for r in rows if "refresh" in r] == [3]
    refreshed = load_refresh(tmp_path / "trained" / "refresh" / "refresh-0001", store, base.layout)
    assert np.array_equal(np.sort(np.asarray(refreshed.ids), 1), np.sort(cand, 1))
