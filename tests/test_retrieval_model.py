"""A retrieval model end to end: trained with precomputed neighbours, it must use them."""

from __future__ import annotations

import random

import numpy as np

from knnformer.config import load_config
from knnformer.data.corpus import Document
from knnformer.data.datastore import Datastore, write_datastore
from knnformer.data.tokenizer import ByteTokenizer
from knnformer.eval.evaluate import evaluate_run
from knnformer.eval.overlap import longest_shared_run
from knnformer.retrieval.build import index_datastore
from knnformer.train.trainer import train

C = 16


def repeated_text_store(tmp_path) -> Datastore:
    """Documents built from a pool of random 64-byte lines: every valid line also occurs in train, so a model
    that reads the neighbour (and its continuation) of a chunk can copy what follows; one that does not must
    guess random letters (ln 26 = 3.26 nats)."""
    rng = random.Random(0)
    pool = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(63)) + "\n" for _ in range(40)]
    docs = [Document(f"doc{i:03d}", "".join(rng.choice(pool) for _ in range(8)), "train") for i in range(60)]
    docs += [Document(f"val{i:03d}", "".join(rng.choice(pool) for _ in range(8)), "valid") for i in range(6)]
    write_datastore(tmp_path / "store", docs, ByteTokenizer(), [])
    index_datastore(tmp_path / "store", embedder="bytes-hash", index="flat", k=4, chunk_size=C)
    return Datastore.open(tmp_path / "store")


def test_longest_shared_run():
    chunks = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    nbs = np.array([[[9, 2, 3, 4, 1, 0]], [[8, 7, 6, 5, 5, 6]]])
    mask = np.ones_like(nbs, dtype=bool)
    assert longest_shared_run(chunks, nbs, mask).tolist() == [3, 2]
    mask[0, 0, 3] = False  # a masked token breaks the run
    assert longest_shared_run(chunks, nbs, mask).tolist() == [2, 2]


def test_retrieval_lowers_loss_on_repeated_text(tmp_path):
    store = repeated_text_store(tmp_path)
    config = load_config("tiny", ["model.context=64", "model.dim=64", "train.steps=450", "train.lr=2e-3",
                                  "train.batch_size=16", "train.eval_interval=0", "train.checkpoint_interval=450",
                                  "retrieval.enabled=true", "retrieval.num_neighbours=2"])
    config.model.vocab_size = 256
    train(tmp_path / "run", store, config)
    result = evaluate_run(tmp_path / "run", "valid")
    assert result["retrieval"] == "on" and result["neighbours"]["chunk_size"] == C
    on, off = result["bits_per_byte"], result["retrieval_off"]["bits_per_byte"]
    # most valid chunks are copies of train text: retrieval must cut the loss a lot (a model that cannot
    # read its neighbours stays near log2(26) = 4.7 bits per byte)
    assert on < 0.75 * off, (on, off)
    assert result["filtered"]["1.0"]["fraction"] == 1.0
    assert result["filtered"]["0.125"]["fraction"] < 0.5  # most chunks overlap their neighbours


def test_generation_shows_the_neighbours_it_used(tmp_path, capsys):
    """Provenance: every neighbour listed for a generated chunk is real train text at the stated offset."""
    import json

    from knnformer.cli import main

    store = repeated_text_store(tmp_path)
    config = load_config("tiny", ["model.context=64", "train.steps=3", "train.eval_interval=0",
                                  "retrieval.enabled=true"])
    config.model.vocab_size = 256
    train(tmp_path / "run", store, config)
    prompt = store.tokenizer.decode(store.split_tokens("valid")[:40])
    assert main(["-q", "generate", str(tmp_path / "run"), "--prompt", prompt, "--max-new-tokens", "30",
                 "--seed", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["retrieval"] is True and out["retrievals"] >= 4
    texts = {doc_id: store.tokenizer.decode(store.tokens[row["start"] : row["start"] + row["length"]])
             for row, doc_id in zip(store.docs, store.doc_ids)}
    served = [n for c in out["chunks"] for n in c["neighbours"]]
    assert served
    for n in served:
        assert n["split"] == "train"
        doc = texts[n["doc_id"]].encode("utf-8")
        assert doc[n["byte_offset"] :].startswith(n["text"].encode("utf-8")[: len(doc) - n["byte_offset"]])
    # the prompt's chunk 1 is a pool line also found in train: the chunk it retrieved is that exact text
    by_source = {c["retrieved_with_chunk"]: c for c in out["chunks"]}
    assert prompt[16:32] in [n["text"] for n in by_source[1]["neighbours"]]
