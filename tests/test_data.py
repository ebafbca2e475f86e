"""Tokenizers, corpus reading, splits and the datastore."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHAKESPEARE, make_corpus, make_datastore

from knnformer.data.corpus import (
    Document,
    apply_split_file,
    assign_splits,
    hash_fraction,
    read_documents,
    read_split_file,
)
from knnformer.data.datastore import Datastore, build_tokenizer, write_datastore
from knnformer.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer, tokenizer_from_json

TEXT = "def f(x):\n    return x ** 2  # naïve café, 日本語, emoji 🙂\n"


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert tokenizer_from_json(tok.to_json()).encode(TEXT) == ids


def test_bpe_tokenizer_round_trip_and_byte_lengths(tmp_path):
    tok = BPETokenizer.train([TEXT * 20, "hello world " * 50], vocab_size=300)
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode("utf-8"))  # merges happened
    assert tok.decode(ids) == TEXT
    # every token's byte length adds up to the UTF-8 length: the basis of bits per byte
    assert int(tok.token_bytes[ids].sum()) == len(TEXT.encode("utf-8"))
    assert b"".join(tok.id_to_bytes(i) for i in ids) == TEXT.encode("utf-8")
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.encode(TEXT) == ids and loaded.fingerprint() == tok.fingerprint()
    assert tok.token_bytes[tok.eot_id] == 0


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_datastore_round_trip(tmp_path, kind):
    store = make_datastore(tmp_path, kind)
    docs, _ = read_documents([str(tmp_path / "corpus")])
    texts = {d.doc_id: d.text for d in docs}
    previous_split = 0
    for row, doc_id in zip(store.docs, store.doc_ids):
        ids = store.tokens[row["start"] : row["start"] + row["length"]]
        assert store.tokenizer.decode(ids) == texts[doc_id]
        assert row["num_bytes"] == len(texts[doc_id].encode("utf-8"))
        assert row["split"] >= previous_split  # train, then valid, then test: each split contiguous
        previous_split = row["split"]
    total_bytes = sum(store.split_bytes(s) for s in ("train", "valid", "test"))
    assert total_bytes == sum(len(t.encode("utf-8")) for t in texts.values())
    assert len(store.split_tokens("train")) == store.manifest["splits"]["train"]["tokens"]


def test_split_is_deterministic_and_stable(tmp_path):
    corpus = make_corpus(tmp_path / "c", num_docs=40)
    docs_a = assign_splits(read_documents([str(corpus)])[0], 0.2, 0.1)
    docs_b = assign_splits(read_documents([str(corpus)])[0], 0.2, 0.1)
    assert [d.split for d in docs_a] == [d.split for d in docs_b]
    assert {d.split for d in docs_a} == {"train", "valid", "test"}
    # a document's split depends on its id only: adding a file moves no other
    (corpus / "zzz-new.txt").write_text("a new document")
    docs_c = {d.doc_id: d.split for d in assign_splits(read_documents([str(corpus)])[0], 0.2, 0.1)}
    assert all(docs_c[d.doc_id] == d.split for d in docs_a)
    assert 0 <= hash_fraction("x") < 1 and hash_fraction("x") == hash_fraction("x")


def test_single_document_is_split_by_position_like_nanogpt():
    text = "abcdefghij" * 100
    pieces = assign_splits([Document("one.txt", text)], 0.1, 0.0)
    assert [(p.split, len(p.text)) for p in pieces] == [("train", 900), ("valid", 100)]
    assert "".join(p.text for p in pieces) == text


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="shared corpus not present")
def test_shakespeare_split_matches_nanogpt(tmp_path):
    docs, _ = read_documents([str(SHAKESPEARE)])
    docs = assign_splits(docs, 0.1, 0.0)
    store = write_datastore(tmp_path / "s", docs, ByteTokenizer(), [str(SHAKESPEARE)])
    store = Datastore.open(store)
    n = len(SHAKESPEARE.read_text())
    assert len(store.split_tokens("train")) == int(n * 0.9)  # nanoGPT's data[:int(n*0.9)]


def test_split_file(tmp_path):
    corpus = make_corpus(tmp_path / "c", num_docs=4)
    (tmp_path / "split.tsv").write_text("file\tsuggested_split\n" + "".join(
        f"doc{i:02d}.txt\t{s}\n" for i, s in enumerate(["train", "valid", "test", "train"])))
    docs = apply_split_file(read_documents([str(corpus)])[0], read_split_file(str(tmp_path / "split.tsv")))
    assert [d.split for d in docs] == ["train", "valid", "test", "train"]
    (tmp_path / "bad.csv").write_text("file,split\ndoc00.txt,holdout\n")
    with pytest.raises(ValueError, match="holdout"):
        read_split_file(str(tmp_path / "bad.csv"))
    (tmp_path / "short.csv").write_text("file,split\ndoc00.txt,train\n")
    with pytest.raises(ValueError, match="not in the split file"):
        apply_split_file(read_documents([str(corpus)])[0], read_split_file(str(tmp_path / "short.csv")))


def test_jsonl_records_are_documents(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"r{i}", "body": f"record {i} text"}) for i in range(3)) + "\n")
    docs, _ = read_documents([str(path)], text_field="body")
    assert [(d.doc_id, d.text) for d in docs] == [("r0", "record 0 text"), ("r1", "record 1 text"),
                                                  ("r2", "record 2 text")]
    with pytest.raises(ValueError, match="no text field 'text'"):
        read_documents([str(path)])


def test_binary_and_non_utf8_files_are_skipped_or_refused(tmp_path):
    corpus = make_corpus(tmp_path / "c", num_docs=2)
    (corpus / "image.bin").write_bytes(b"\x89PNG\x00\x00\x01")
    (corpus / "latin1.txt").write_bytes("café".encode("latin-1"))
    docs, report = read_documents([str(corpus)])
    assert len(docs) == 2 and report.num_binary == 1 and report.num_not_utf8 == 1
    with pytest.raises(ValueError, match="image.bin is binary"):
        read_documents([str(corpus)], strict=True)


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_documents([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty UTF-8 text"):
        read_documents([str(tmp_path / "empty")])


def test_datastore_refuses_mismatch_and_truncation(tmp_path):
    store = make_datastore(tmp_path, "bytes")
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["format_version"] = 999
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format 999"):
        Datastore.open(store.path)
    store = make_datastore(tmp_path / "b", "bytes")
    data = (store.path / "tokens.bin").read_bytes()
    (store.path / "tokens.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        Datastore.open(store.path)
    store = make_datastore(tmp_path / "c", "bytes")
    (store.path / "tokenizer.json").write_text(BPETokenizer.train(["x y z " * 10], 260).to_json())
    with pytest.raises(ValueError, match="does not match the manifest"):
        Datastore.open(store.path)


def test_existing_datastore_is_not_damaged_without_force(tmp_path):
    store = make_datastore(tmp_path, "bytes")
    before = (store.path / "tokens.bin").read_bytes()
    with pytest.raises(ValueError, match="--force"):
        write_datastore(store.path, [Document("x", "other text")], ByteTokenizer(), [])
    assert (store.path / "tokens.bin").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_empty_train_split_is_refused_for_bpe():
    docs = [Document("a", "text", "valid")]
    with pytest.raises(ValueError, match="train split is empty"):
        build_tokenizer(docs, "bpe", 300)
    assert np.array_equal(ByteTokenizer().token_bytes, np.ones(256))
