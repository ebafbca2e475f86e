"""The datastore: a corpus tokenized once, memory-mapped for every later stage.

Layout (see DESIGN.md)::

    DATASTORE/
      manifest.json   what built it: corpus sha256, tokenizer, split sizes, versions
      tokenizer.json  raw bytes or byte-level BPE
      tokens.bin      token ids of every document, train documents first, then valid, then test
      docs.npy        one row per document: start, length (tokens), num_bytes (UTF-8), split (0/1/2)
      docs.json       each document's id (file path or record id), in the same order

Each split is one contiguous range of ``tokens.bin``. A datastore is written to a temporary folder and renamed
into place, so a failed or interrupted ``prepare`` never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knnformer import __version__
from knnformer.data.corpus import SPLITS, Document
from knnformer.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer
from knnformer.io import checked_sha256, file_sha256, writing_folder

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DOC_DTYPE = np.dtype([("start", "<i8"), ("length", "<i8"), ("num_bytes", "<i8"), ("split", "i1")])


def corpus_sha256(docs: list[Document]) -> str:
    """A hash of every document's id and text, independent of how they were split."""
    h = hashlib.sha256()
    for doc in sorted(docs, key=lambda d: d.doc_id):
        h.update(doc.doc_id.encode("utf-8") + b"\0")
        h.update(doc.text.encode("utf-8") + b"\0")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import tokenizers

    return {"knnformer": __version__, "numpy": np.__version__, "tokenizers": tokenizers.__version__,
            "python": platform.python_version()}


def build_tokenizer(docs: list[Document], kind: str, vocab_size: int) -> Tokenizer:
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        train_texts = [d.text for d in docs if d.split == "train"]
        if not train_texts:
            raise ValueError("the train split is empty: a BPE tokenizer is trained on it; lower --valid-fraction")
        return BPETokenizer.train(train_texts, vocab_size)
    raise ValueError(f"--tokenizer must be bytes or bpe, got {kind!r}")


def encoding_batches(lengths: list[int], max_chars: int = 4 << 20, max_docs: int = 256) -> list[tuple[int, int]]:
    """Consecutive [begin, end) ranges of documents to tokenize together: at most ``max_docs`` documents and
    ``max_chars`` characters each (a longer document is a batch of its own). The tokenizer's per-token
    intermediates are many times the text's size, so bounding a batch by characters bounds prepare's memory."""
    batches, begin, chars = [], 0, 0
    for i, n in enumerate(lengths):
        if i > begin and (chars + n > max_chars or i - begin == max_docs):
            batches.append((begin, i))
            begin, chars = i, 0
        chars += n
    if begin < len(lengths):
        batches.append((begin, len(lengths)))
    return batches


def _with_eot(ids: list[int], eot_id: int, dtype) -> np.ndarray:
    out = np.empty(len(ids) + 1, dtype=dtype)
    out[:-1] = ids
    out[-1] = eot_id
    return out


def write_datastore(out: str | Path, docs: list[Document], tokenizer: Tokenizer, sources: list[str],
                    overwrite: bool = False, progress=None) -> Path:
    """Tokenize ``docs`` (already split) and write the datastore atomically. ``progress(n)`` gets document counts."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --force to replace it")
    check_replaceable(out, overwrite)
    order = sorted(range(len(docs)), key=lambda i: SPLITS.index(docs[i].split))
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    with writing_folder(out) as tmp:
        rows = _write_tokens(tmp / "tokens.bin", docs, order, tokenizer, dtype, progress)
        num_tokens = int(rows["length"].sum())
        tokens_sha256 = file_sha256(tmp / "tokens.bin")
        np.save(tmp / "docs.npy", rows)
        (tmp / "docs.json").write_text(json.dumps([docs[i].doc_id for i in order], ensure_ascii=False))
        (tmp / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
        manifest = {
            "format_version": FORMAT_VERSION,
            "corpus_sha256": corpus_sha256(docs),
            "sources": sources,
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                          "fingerprint": tokenizer.fingerprint()},
            "token_dtype": np.dtype(dtype).name,
            "num_tokens": num_tokens,
            "tokens_sha256": tokens_sha256,
            "splits": _split_ranges(rows, num_tokens),
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


MANIFEST_KEYS = {"tokenizer": ("kind", "vocab_size", "fingerprint"), "token_dtype": (), "num_tokens": (),
                 "splits": SPLITS}
SPLIT_KEYS = ("documents", "tokens", "bytes", "start", "end")


def _check_manifest_keys(path: Path, manifest: dict) -> None:
    """Refuse a manifest with a key every reader needs missing, naming the key (not a KeyError later)."""
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    missing += [f"{key}.{sub}" for key, subs in MANIFEST_KEYS.items() if isinstance(manifest.get(key), dict)
                for sub in subs if sub not in manifest[key]]
    if not missing and isinstance(manifest.get("splits"), dict):
        missing += [f"splits.{name}.{k}" for name in SPLITS if isinstance(manifest["splits"].get(name), dict)
                    for k in SPLIT_KEYS if k not in manifest["splits"][name]]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing[:4])}; rebuild with `knnformer prepare --force`")


def check_token_ids(path: Path, tokens: np.ndarray, vocab_size: int, block: int = 1 << 24) -> None:
    """Refuse token ids at or above the vocabulary size (the model's embedding would fail on them)."""
    for lo in range(0, len(tokens), block):
        top = int(np.max(tokens[lo : lo + block]))
        if top >= vocab_size:
            raise ValueError(f"{path}/tokens.bin holds token id {top}, at or above the tokenizer's vocabulary of "
                             f"{vocab_size}; rebuild with `knnformer prepare --force`")


def is_datastore(path: str | Path) -> bool:
    """Whether ``path`` is a datastore folder: it holds a ``manifest.json`` with the datastore's format version."""
    try:
        return "format_version" in json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_replaceable(out: Path, force: bool) -> None:
    """``prepare --force`` replaces a datastore and nothing else: refuse a file, or a folder that is not a
    datastore (a run folder, a corpus, a home directory), since replacing it would delete what it holds."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; pick another --out")
    if force and not is_datastore(out) and any(out.iterdir()):
        raise ValueError(f"--out {out} is not a datastore (no datastore manifest.json) and --force would delete "
                         "what it holds; pick another --out, or empty it yourself")


def _write_tokens(path: Path, docs: list[Document], order: list[int], tokenizer: Tokenizer, dtype,
                  progress=None) -> np.ndarray:
    """Tokenize the documents in ``order`` batch by batch, appending their ids to ``path``; returns their
    ``docs.npy`` rows (start, length, num_bytes, split), in that order."""
    rows = np.zeros(len(docs), dtype=DOC_DTYPE)
    start = 0
    with open(path, "wb") as f:
        for b, e in encoding_batches([len(docs[i].text) for i in order]):
            idx = order[b:e]
            texts = [docs[i].text for i in idx]
            if isinstance(tokenizer, BPETokenizer):
                encoded = [_with_eot(ids, tokenizer.eot_id, dtype) for ids in tokenizer.encode_batch(texts)]
            else:
                encoded = [tokenizer.encode_array(t).astype(dtype) for t in texts]
            for row, i, ids in zip(range(b, e), idx, encoded):
                ids.tofile(f)
                rows[row] = (start, len(ids), len(docs[i].text.encode("utf-8")), SPLITS.index(docs[i].split))
                start += len(ids)
            if progress is not None:
                progress(len(idx))
    return rows


def _split_ranges(rows: np.ndarray, num_tokens: int) -> dict[str, dict[str, int]]:
    """The manifest's ``splits``: each split's document, token and byte counts and its ``[start, end)`` range of
    ``tokens.bin`` (an empty split starts, and ends, at ``num_tokens``)."""
    splits = {}
    for s, name in enumerate(SPLITS):
        sel = rows[rows["split"] == s]
        lo = int(sel["start"].min()) if len(sel) else num_tokens
        splits[name] = {"documents": int(len(sel)), "tokens": int(sel["length"].sum()),
                        "bytes": int(sel["num_bytes"].sum()), "start": lo, "end": lo + int(sel["length"].sum())}
    return splits


@dataclass
class Datastore:
    """A read-only view of a prepared datastore; token arrays are memory-mapped, never loaded whole."""

    path: Path
    manifest: dict
    tokenizer: Tokenizer
    tokens: np.memmap
    docs: np.ndarray
    doc_ids: list[str]

    @classmethod
    def open(cls, path: str | Path) -> "Datastore":
        try:
            return cls._open(Path(path))
        except (KeyError, TypeError) as e:  # a manifest with keys missing or of the wrong type
            raise ValueError(f"{Path(path) / 'manifest.json'} is missing or has a malformed entry {e}; rebuild "
                             "with `knnformer prepare --force`") from None

    @classmethod
    def _open(cls, path: Path) -> Datastore:
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise ValueError(f"{path} is not a datastore (no manifest.json); build one with `knnformer prepare`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{manifest_path} is corrupt; rebuild with `knnformer prepare --force`") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} was built by datastore format {manifest.get('format_version')} "
                             f"(knnformer {manifest.get('versions', {}).get('knnformer')}); this knnformer reads "
                             f"format {FORMAT_VERSION}: rebuild it with `knnformer prepare --force`")
        _check_manifest_keys(manifest_path, manifest)
        tokenizer = load_tokenizer(path / "tokenizer.json")
        if tokenizer.fingerprint() != manifest["tokenizer"]["fingerprint"]:
            raise ValueError(f"{path}/tokenizer.json does not match the manifest's tokenizer; "
                             "rebuild with `knnformer prepare --force`")
        expected = manifest["num_tokens"] * np.dtype(manifest["token_dtype"]).itemsize
        actual = (path / "tokens.bin").stat().st_size if (path / "tokens.bin").exists() else -1
        if actual != expected:
            raise ValueError(f"{path}/tokens.bin is truncated or missing ({actual} bytes, expected {expected}); "
                             "rebuild with `knnformer prepare --force`")
        try:
            tokens = np.memmap(path / "tokens.bin", dtype=manifest["token_dtype"], mode="r")
            docs = np.load(path / "docs.npy")
            doc_ids = json.loads((path / "docs.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is incomplete or corrupt ({e}); rebuild with `knnformer prepare --force`") from None
        if len(tokens) != manifest["num_tokens"] or len(docs) != len(doc_ids):
            raise ValueError(f"{path}/tokens.bin is truncated; rebuild with `knnformer prepare --force`")
        if "tokens_sha256" in manifest:  # read once per change of the file, then remembered (io.checked_sha256)
            checked_sha256(path / "tokens.bin", manifest["tokens_sha256"], "`knnformer prepare --force`",
                           also=lambda: check_token_ids(path, tokens, tokenizer.vocab_size))
        return cls(path, manifest, tokenizer, tokens, docs, doc_ids)

    def split_range(self, split: str) -> tuple[int, int]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        info = self.manifest["splits"][split]
        return info["start"], info["end"]

    BYTE_MARK_EVERY = 4096
    """Tokens between two kept running totals of token bytes (``bytes_before``): 2 KiB of marks per million
    tokens, and at most this many token lengths summed per lookup."""

    def bytes_before(self, position: int) -> int:
        """UTF-8 bytes of ``tokens[:position]``: a running total kept every ``BYTE_MARK_EVERY`` tokens (computed
        on the first call, one pass over the memory map in blocks) plus the few tokens after the last mark, so a
        chunk's byte offset in a long document costs the same as in a short one (a server cites many per
        second)."""
        marks = self.__dict__.get("_byte_marks")
        every = self.BYTE_MARK_EVERY
        if marks is None:
            lengths = self.tokenizer.token_bytes
            n = len(self.tokens)
            sums, block = [], every * 256
            for lo in range(0, n - n % every, block):
                hi = min(lo + block, n - n % every)
                sums.append(lengths[np.asarray(self.tokens[lo:hi], dtype=np.int64)].reshape(-1, every).sum(1))
            marks = np.cumsum(np.concatenate([np.zeros(1, dtype=np.int64), *sums]))  # marks[m]: bytes before m * every
            self.__dict__["_byte_marks"] = marks
        position = int(position)
        if not 0 <= position <= len(self.tokens):
            raise ValueError(f"token position {position} outside the datastore's {len(self.tokens)} tokens")
        mark = position // every
        tail = np.asarray(self.tokens[mark * every : position], dtype=np.int64)
        return int(marks[mark]) + (int(self.tokenizer.token_bytes[tail].sum()) if len(tail) else 0)

    def split_tokens(self, split: str) -> np.ndarray:
        """The split's token ids, a memory-mapped view."""
        lo, hi = self.split_range(split)
        return self.tokens[lo:hi]

    def split_bytes(self, split: str) -> int:
        return self.manifest["splits"][split]["bytes"]

    def require_split(self, split: str, min_tokens: int) -> np.ndarray:
        data = self.split_tokens(split)
        if len(data) < min_tokens:
            raise ValueError(f"the {split} split of {self.path} has {len(data)} tokens, fewer than the {min_tokens} "
                             f"needed; re-run `knnformer prepare` with a larger corpus or other split fractions")
        return data
