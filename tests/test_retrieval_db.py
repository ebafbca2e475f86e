"""Retrieval databases (``--retrieval-db``): a run reads text it was not trained on through cca, kNN-LM or
in-context retrieval, the leakage filter keeps copies of held-out documents out (and says how many), and every
bad database is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_corpus

from knnformer.cli import main
from knnformer.data.corpus import Document
from knnformer.data.datastore import Datastore, write_datastore
from knnformer.retrieval.database import database_neighbours, document_hashes, open_databases


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def error(capsys, *argv) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2, (argv, err)
    assert err.startswith("knnformer: error: ") and "Traceback" not in err and err.count("\n") == 1
    return err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store and a tiny dense run and RETRO run on it (chunks of 4), and a database of other documents that
    also holds an exact copy of one valid document of the store (under another name)."""
    import _pytest.capture  # noqa: F401  (capsys is function-scoped: the module fixture prints through main)

    tmp = tmp_path_factory.mktemp("db")
    corpus = make_corpus(tmp / "corpus", num_docs=10)
    assert main(["-q", "prepare", str(corpus), "--out", str(tmp / "store"), "--tokenizer", "bpe", "--vocab-size",
                 "300", "--valid-fraction", "0.2", "--test-fraction", "0.2"]) == 0
    store = Datastore.open(tmp / "store")
    assert main(["-q", "index", str(tmp / "store"), "--chunk-size", "4", "--k", "2"]) == 0
    assert main(["-q", "train", str(tmp / "store"), "--out", str(tmp / "dense"), "--config", "tiny",
                 "--set", "train.steps=15"]) == 0
    assert main(["-q", "train", str(tmp / "store"), "--out", str(tmp / "retro"), "--config", "tiny",
                 "--set", "train.steps=15", "--set", "retrieval.enabled=true"]) == 0
    other = make_corpus(tmp / "other", num_docs=6, seed=7)
    valid_row = int(np.nonzero(np.asarray(store.docs["split"]) == 1)[0][0])
    src = Path(store.manifest["sources"][0]) / store.doc_ids[valid_row]
    shutil.copy(src, other / "copied-under-another-name.txt")
    assert main(["-q", "prepare", str(other), "--out", str(tmp / "db"), "--tokenizer-from", str(tmp / "dense")]) == 0
    assert main(["-q", "index", str(tmp / "db"), "--chunk-size", "4", "--no-neighbours"]) == 0
    return tmp


def test_prepare_with_a_runs_tokenizer_puts_every_document_in_train(setup):
    db, store = Datastore.open(setup / "db"), Datastore.open(setup / "store")
    assert db.manifest["tokenizer"]["fingerprint"] == store.manifest["tokenizer"]["fingerprint"]
    assert db.manifest["splits"]["train"]["documents"] == 7 and db.manifest["splits"]["valid"]["documents"] == 0


def test_held_out_copies_are_never_retrieved_and_counted(setup):
    store = Datastore.open(setup / "store")
    dbs = open_databases([setup / "db"], store.manifest["tokenizer"]["fingerprint"], 4)
    nb = database_neighbours(dbs, store, ("valid", "test"), 2)
    assert dbs.excluded["documents"] == 1 and dbs.excluded["chunks"] > 0
    held = set(document_hashes(store)[np.asarray(store.docs["split"]) >= 1])
    db = dbs.dbs[0]
    hashes = document_hashes(db.store)
    lo, hi = nb.layout.split_chunks["valid"][0], nb.layout.split_chunks["test"][1]
    got = nb.ids[lo:hi]
    assert (got >= 0).sum() > 0.9 * got.size
    for cid in got[got >= 0]:
        first, last = db.layout.doc_first[cid], db.layout.doc_last[cid]
        assert hashes[first] not in held and hashes[last] not in held
    # without the filter the copy is what valid retrieves most: the filter is doing the work
    db.banned[:] = False
    unfiltered = database_neighbours(dbs, store, ("valid",), 2).ids
    copy_doc = int(np.nonzero([h in held for h in hashes])[0][0])
    assert np.isin(db.layout.doc_first[unfiltered[unfiltered >= 0]], [copy_doc]).any()


def test_train_queries_never_retrieve_a_copy_of_their_own_document(setup, tmp_path):
    store = Datastore.open(setup / "store")
    # a database holding the store's own train documents: every train chunk would find itself
    docs = [Document(f"copy-{i}", store.tokenizer.decode(np.asarray(store.tokens[s : s + n - 1])), "train")
            for i, (s, n, _, sp) in enumerate(store.docs) if sp == 0]
    write_datastore(tmp_path / "self", docs, store.tokenizer, ["copies"])
    assert main(["-q", "index", str(tmp_path / "self"), "--chunk-size", "4", "--k", "2"]) == 0
    dbs = open_databases([tmp_path / "self"], store.manifest["tokenizer"]["fingerprint"], 4)
    nb = database_neighbours(dbs, store, ("train",), 2)
    db = dbs.dbs[0]
    assert (db.copies >= 0).any(), "the database copies the train documents"
    lo, hi = nb.layout.split_chunks["train"]
    for q in range(lo, hi):
        own = {int(nb.layout.doc_first[q]), int(nb.layout.doc_last[q])}
        for cid in nb.ids[q][nb.ids[q] >= 0]:
            assert not own & set(db.copies[cid].tolist())


@pytest.mark.parametrize("mode", ["in-context", "knn-lm"])
def test_evaluate_reads_a_database_in_each_mode_beside_retrieval_off(setup, capsys, mode):
    code, out, _ = run(capsys, "evaluate", setup / "dense", "--retrieval-db", setup / "db", "--mode", mode,
                       "--json")
    r = json.loads(out)
    assert code == 0 and r["mode"] == mode
    assert r["database"]["excluded"]["documents"] == 1
    assert r["bits_per_byte"] > 0 and r["retrieval_off"]["bits_per_byte"] > 0
    assert r["gain"] == pytest.approx(1 - r["bits_per_byte"] / r["retrieval_off"]["bits_per_byte"])
    assert set(r["filtered"]) == {"0.125", "0.25", "0.5", "1.0"} and "filtered" in r["retrieval_off"]
    code, out, _ = run(capsys, "evaluate", setup / "dense", "--retrieval-db", setup / "db", "--mode", mode)
    assert code == 0 and "excluded 1 database documents" in out and "overlap <= 0.125" in out


def test_in_context_with_an_empty_prefix_equals_retrieval_off(setup):
    """With no neighbour in context, in-context scoring is the plain model over the same windows."""
    from knnformer.eval.incontext import score_in_context
    from knnformer.eval.scoring import score_tokens
    from knnformer.run.record import load_run, open_run_datastore

    model, record, _ = load_run(setup / "dense")
    store = open_run_datastore(record)
    tokens = store.split_tokens("valid")
    T = model.config.context
    on = score_in_context(model, tokens, store.tokenizer.token_bytes, 4, lambda q: [np.zeros(0, np.int64)] * len(q),
                          stride=8)
    # sliding windows of the context at stride 8 see up to T - 1 tokens of history, as the in-context windows do
    off = score_tokens(model, tokens, store.tokenizer.token_bytes, stride=8)
    assert on["tokens"] == off["tokens"] == len(tokens) - 1 and T > 8
    assert on["nll"] == pytest.approx(off["nll"], rel=1e-4)


def test_cca_reads_a_database_through_a_retro_run(setup, capsys):
    code, out, _ = run(capsys, "evaluate", setup / "retro", "--retrieval-db", setup / "db", "--json")
    r = json.loads(out)
    assert code == 0 and r["mode"] == "cca" and r["database"]["excluded"]["documents"] == 1
    assert r["bits_per_byte"] != r["retrieval_off"]["bits_per_byte"]
    err = error(capsys, "evaluate", setup / "dense", "--retrieval-db", setup / "db", "--mode", "cca")
    assert "trained without retrieval" in err


def test_bad_databases_give_one_line_errors(setup, capsys, tmp_path):
    store = Datastore.open(setup / "store")
    # another tokenizer
    other = make_corpus(tmp_path / "c", num_docs=4, seed=3)
    assert main(["-q", "prepare", str(other), "--out", str(tmp_path / "bytes-db"), "--valid-fraction", "0",
                 "--test-fraction", "0"]) == 0
    assert "another tokenizer" in error(capsys, "evaluate", setup / "dense", "--retrieval-db", tmp_path / "bytes-db",
                                        "--mode", "knn-lm")
    # prepared but never indexed (or indexing never finished)
    assert main(["-q", "prepare", str(other), "--out", str(tmp_path / "raw"), "--tokenizer-from",
                 str(setup / "dense")]) == 0
    assert "has no index" in error(capsys, "evaluate", setup / "dense", "--retrieval-db", tmp_path / "raw",
                                   "--mode", "in-context")
    # missing
    assert "not a datastore" in error(capsys, "evaluate", setup / "dense", "--retrieval-db", tmp_path / "nowhere")
    # half-written: tokens.bin truncated
    shutil.copytree(setup / "db", tmp_path / "half")
    with open(tmp_path / "half" / "tokens.bin", "r+b") as f:
        f.truncate(10)
    assert "truncated" in error(capsys, "evaluate", setup / "dense", "--retrieval-db", tmp_path / "half")
    # another chunk size than the RETRO run reads
    shutil.copytree(setup / "db", tmp_path / "c8")
    assert main(["-q", "index", str(tmp_path / "c8"), "--chunk-size", "8", "--k", "2"]) == 0
    assert "chunks of 8 tokens" in error(capsys, "evaluate", setup / "retro", "--retrieval-db", tmp_path / "c8")
    # zero chunks to retrieve: every document held out
    docs = [Document("a", "some text here", "valid"), Document("b", "more text", "train")]
    write_datastore(tmp_path / "empty", docs[:1] + [Document("b", "x", "test")], store.tokenizer, ["x"])
    err = error(capsys, "evaluate", setup / "dense", "--retrieval-db", tmp_path / "empty", "--mode", "knn-lm")
    assert "0 train chunks" in err or "no index" in err
    # --tokenizer-from something that is neither a run nor a datastore
    assert "neither a run" in error(capsys, "prepare", other, "--out", tmp_path / "x", "--tokenizer-from", tmp_path)


@pytest.mark.parametrize("run_name", ["dense", "retro"])
def test_generate_shows_which_database_file_served_each_chunk(setup, capsys, run_name):
    code, out, _ = run(capsys, "generate", setup / run_name, "--prompt", "the model reads its corpus",
                       "--max-new-tokens", "12", "--seed", "0", "--retrieval-db", setup / "db", "--json")
    r = json.loads(out)
    assert code == 0 and r["retrieval"] is True
    served = [n for c in r["chunks"] for n in c["neighbours"]]
    assert served and all(n["database"] == str(setup / "db") for n in served)
    db = Datastore.open(setup / "db")
    assert all(n["doc_id"] in db.doc_ids for n in served)
    code, out, _ = run(capsys, "generate", setup / run_name, "--prompt", "the model reads", "--max-new-tokens", "8",
                       "--seed", "0", "--retrieval-db", setup / "db", "--show-neighbours")
    assert code == 0 and "neighbours that served each generated chunk" in out and "] db:" in out


def test_in_context_generation_reads_the_neighbours_text(setup):
    """The in-context window is the last chunk's neighbours (nearest last) followed by the end of the text."""
    from knnformer.run.record import load_run
    from knnformer.serve.generate import RetrievingGenerator

    model, record, _ = load_run(setup / "dense")
    store = Datastore.open(setup / "store")
    gen = RetrievingGenerator.for_databases(model, store, setup / "dense", record, [str(setup / "db")], k=1)
    assert gen.in_context and gen.C == 4
    ids = store.tokenizer.encode("the model reads its corpus while it writes")
    for chunk in range(len(ids) // 4):
        gen.retrieve(ids, chunk)
    window = gen.in_context_window(ids)
    nb = gen.retrieved[len(ids) // 4 - 1]
    prefix = nb.tokens[0, 0][nb.mask[0, 0]].tolist()
    assert window[: len(prefix)] == prefix and window[len(prefix):] == ids[-(len(window) - len(prefix)):]
    assert len(window) <= model.config.context


def test_retro_trains_against_a_database_and_reads_it_again(setup, capsys, tmp_path):
    """train --retrieval-db: the run's neighbours come from the database (recorded in its config), and evaluate
    and generate read the same database by default."""
    run_dir = tmp_path / "retro-db"
    code, out, _ = run(capsys, "train", setup / "store", "--out", run_dir, "--config", "tiny", "--set",
                       "train.steps=6", "--retrieval-db", setup / "db")
    assert code == 0 and "trained to step 6" in out
    saved = json.loads((run_dir / "config.json").read_text())["config"]["retrieval"]
    assert saved["enabled"] and saved["search"]["databases"] == str((setup / "db").resolve())
    code, out, _ = run(capsys, "evaluate", run_dir, "--json", "--neighbour-gain", "0")
    r = json.loads(out)
    assert code == 0 and r["database"]["excluded"]["documents"] == 1 and "retrieval_off" in r
    code, out, _ = run(capsys, "generate", run_dir, "--prompt", "the model reads its", "--max-new-tokens", "8",
                       "--seed", "0", "--json")
    served = [n for c in json.loads(out)["chunks"] for n in c["neighbours"]]
    assert code == 0 and served and all(n["database"] == str((setup / "db").resolve()) for n in served)


@pytest.mark.slow
def test_demo_prints_retrieval_off_beside_the_database_and_the_files_that_served(tmp_path, capsys):
    """The whole demo with a few training steps (minutes: a 6 MB database and its kNN-LM keys)."""
    from knnformer.cli.demo import run_demo

    run_demo(tmp_path / "demo", steps=10)
    out = capsys.readouterr().out
    assert "leakage filter:" in out and "alpha 0.125" in out
    assert "kNN-LM (any run, no training)" in out and "in context (any run, no training)" in out
    assert "neighbours that served each generated chunk" in out and "] database:" in out


def test_demo_table_and_generation_read_the_database(setup, capsys):
    """The demo's last two steps on the tiny run: retrieval off, with the database and alpha 0.125 side by side,
    then generation naming the database file that served each chunk."""
    from knnformer.cli.demo import compare_modes, generate_with_database

    results = compare_modes(setup / "dense", setup / "db")
    out = capsys.readouterr().out
    assert set(results) == {"knn-lm", "in-context"}
    assert "leakage filter: 1 database files copy held-out files" in out
    for label, mode in (("kNN-LM (any run, no training)", "knn-lm"), ("in context (any run, no training)",
                                                                      "in-context")):
        line = next(row for row in out.splitlines() if row.startswith(label))
        assert f"{results[mode]['bits_per_byte']:.4f}" in line
        assert f"{results[mode]['retrieval_off']['bits_per_byte']:.4f}" in line
    generate_with_database(setup / "dense", Datastore.open(setup / "store"), setup / "db", "the model", 12)
    out = capsys.readouterr().out
    assert out.startswith("the model") and "] db:" in out


def test_databases_smaller_than_k_pad_with_none(setup, tmp_path):
    store = Datastore.open(setup / "store")
    write_datastore(tmp_path / "one", [Document("one", "the model reads", "train")], store.tokenizer, ["x"])
    assert main(["-q", "index", str(tmp_path / "one"), "--chunk-size", "4", "--no-neighbours"]) == 0
    dbs = open_databases([tmp_path / "one", setup / "db"], store.manifest["tokenizer"]["fingerprint"], 4)
    small = open_databases([tmp_path / "one"], store.manifest["tokenizer"]["fingerprint"], 4)
    _, ids = small.search(["the model reads its corpus"], 8)
    n = small.num_chunks
    assert ids.shape == (1, 8) and (ids[0, :n] >= 0).all() and (ids[0, n:] == -1).all()
    # two databases searched as one: ids are global, each maps back to its own database's file
    _, ids = dbs.search(["the model reads its corpus"], 8)
    where, _ = dbs.locate(ids[0])
    assert set(where.tolist()) <= {0, 1} and all(dbs.source(int(i))["database"] in (str(tmp_path / "one"),
                                                                                 str(setup / "db")) for i in ids[0])


@pytest.mark.parametrize("run_name", ["dense", "retro"])
def test_serve_retrieves_and_cites_from_a_database(setup, run_name):
    """serve --retrieval-db: /v1/retrieve and a completion's citations name the database's files, byte-exact."""
    import httpx

    from knnformer.serve.background import BackgroundServer
    from knnformer.serve.server import open_service

    db = Datastore.open(setup / "db")
    texts = {doc_id: db.tokenizer.decode(np.asarray(db.tokens[s : s + n])).encode()
             for doc_id, (s, n, _, _) in zip(db.doc_ids, db.docs)}
    with BackgroundServer(open_service(setup / run_name, max_batch=2, max_queue=4,
                                       databases=[str(setup / "db")])) as url:
        r = httpx.post(url + "/v1/retrieve", json={"text": "the model reads its corpus", "k": 3}, timeout=60).json()
        assert len(r["data"]) == 3
        for s in r["data"]:
            assert s["database"] == str(setup / "db") and s["doc_id"] in texts
            assert texts[s["doc_id"]][s["byte_span"][0] : s["byte_span"][1]] == s["text"].encode()
        out = httpx.post(url + "/v1/completions", json={"prompt": "the model reads its corpus while it",
                                                        "max_tokens": 10, "temperature": 0}, timeout=60)
        assert out.status_code == 200


def test_in_context_generation_feeds_the_neighbours_to_the_model(setup):
    """Each step's input, once a chunk is complete, starts with that chunk's neighbours (not only shown: read)."""
    from knnformer.run.record import load_run
    from knnformer.serve.generate import RetrievingGenerator

    model, record, _ = load_run(setup / "dense")
    store = Datastore.open(setup / "store")
    gen = RetrievingGenerator.for_databases(model, store, setup / "dense", record, [str(setup / "db")], k=1)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].tolist()))
    try:
        ids = store.tokenizer.encode("the model reads its corpus while it writes")
        list(gen.sample(ids, 6, temperature=0, seed=0))
    finally:
        hook.remove()
    nb = gen.retrieved[len(ids) // 4 - 1]
    prefix = nb.tokens[0, 0][nb.mask[0, 0]].tolist()
    assert seen and seen[0][: len(prefix)] == prefix
