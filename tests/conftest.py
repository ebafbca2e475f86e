"""Shared fixtures: a tiny real corpus written to a temp folder, and the tiny model preset."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from knnformer.config import load_config
from knnformer.data.corpus import assign_splits, read_documents
from knnformer.data.datastore import Datastore, build_tokenizer, write_datastore

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"

WORDS = ("the model reads its corpus while it writes and the corpus is its memory so every chunk it "
         "retrieves shows where its knowledge came from").split()


def make_corpus(folder: Path, num_docs: int = 12, words_per_doc: int = 400, seed: int = 0) -> Path:
    """Plain-text files of pseudo-random English words plus a little Unicode, one document each."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(num_docs):
        words = [rng.choice(WORDS) for _ in range(words_per_doc)]
        (folder / f"doc{d:02d}.txt").write_text(f"Document {d} — café naïve.\n" + " ".join(words) + "\n",
                                              encoding="utf-8")
    return folder


def make_datastore(tmp: Path, tokenizer: str = "bytes", num_docs: int = 12, valid: float = 0.2,
                   test: float = 0.1, vocab_size: int = 300) -> Datastore:
    corpus = make_corpus(tmp / "corpus", num_docs)
    docs, _ = read_documents([str(corpus)])
    docs = assign_splits(docs, valid, test)
    tok = build_tokenizer(docs, tokenizer, vocab_size)
    write_datastore(tmp / f"store-{tokenizer}", docs, tok, [str(corpus)])
    return Datastore.open(tmp / f"store-{tokenizer}")


@pytest.fixture
def corpus_dir(tmp_path):
    return make_corpus(tmp_path / "corpus")


@pytest.fixture
def byte_store(tmp_path):
    return make_datastore(tmp_path, "bytes")


@pytest.fixture
def tiny_config():
    config = load_config("tiny")
    config.model.vocab_size = 256
    return config
