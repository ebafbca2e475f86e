"""Reading a corpus into documents and assigning each document to train, valid or test.

A document is a UTF-8 text file, or one record of a JSONL file. Its ``doc_id`` is its path relative to the
input it was found under (``file.jsonl:LINE`` or the record's id field for JSONL). The split is a
deterministic function of the ``doc_id`` (its sha256), so adding files never moves the others.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


@dataclass
class Document:
    doc_id: str
    text: str
    split: str = "train"


@dataclass
class ReadReport:
    """What reading skipped, so the CLI can say it."""

    num_binary: int = 0
    num_not_utf8: int = 0
    num_empty: int = 0
    examples: list[str] | None = None

    def skipped(self) -> int:
        return self.num_binary + self.num_not_utf8


def _looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:8192]


def _read_text_file(path: Path, strict: bool, report: ReadReport) -> str | None:
    data = path.read_bytes()
    reason = None
    if _looks_binary(data):
        reason, report.num_binary = "binary", report.num_binary + 1
    else:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            reason, report.num_not_utf8 = "not UTF-8", report.num_not_utf8 + 1
    if strict:
        raise ValueError(f"{path} is {reason}; remove it, or drop --strict to skip such files")
    report.examples = (report.examples or []) + [str(path)]
    return None


def list_files(inputs: list[str], glob: str) -> list[tuple[Path, Path]]:
    """Every (file, root) under the inputs: a file is its own root; folders are searched with ``glob``."""
    found: list[tuple[Path, Path]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            found.append((path, path.parent))
        elif path.is_dir():
            matches = sorted(p for p in path.glob(glob) if p.is_file())
            if not matches:
                raise ValueError(f"no files match --glob {glob!r} under {path}")
            found.extend((p, path) for p in matches)
        else:
            raise ValueError(f"corpus path {path} does not exist")
    if not found:
        raise ValueError("no corpus given: name text files, folders or JSONL files")
    return found


def _jsonl_records(path: Path, root: Path, text_field: str, id_field: str) -> Iterator[Document]:
    with path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{line_no} has no text field {text_field!r}; pick it with --text-field")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: field {text_field!r} is not a string")
            rid = record.get(id_field)
            doc_id = str(rid) if rid is not None else f"{path.relative_to(root)}:{line_no}"
            yield Document(doc_id, text)


def read_documents(
    inputs: list[str],
    glob: str = "**/*",
    text_field: str | None = None,
    id_field: str = "id",
    strict: bool = False,
    progress=None,
) -> tuple[list[Document], ReadReport]:
    """Read every document under ``inputs``. JSONL files (``.jsonl`` or any file with ``text_field`` set) give
    one document per record. ``progress`` is called with each file's size in bytes."""
    report = ReadReport()
    docs: list[Document] = []
    for path, root in list_files(inputs, glob):
        size = path.stat().st_size
        if path.suffix == ".jsonl" or (text_field is not None and path.suffix == ".json"):
            try:
                docs.extend(_jsonl_records(path, root, text_field or "text", id_field))
            except UnicodeDecodeError:
                raise ValueError(f"{path} is not UTF-8 JSONL") from None
        else:
            text = _read_text_file(path, strict, report)
            if text is not None:
                if text:
                    docs.append(Document(str(path.relative_to(root)), text))
                else:
                    report.num_empty += 1
        if progress is not None:
            progress(size)
    docs = [d for d in docs if d.text]
    if not docs:
        raise ValueError(f"the corpus {' '.join(inputs)} has no non-empty UTF-8 text")
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"two documents share the id {dup!r}; give distinct paths or record ids")
    return docs, report


def hash_fraction(doc_id: str) -> float:
    """A number in [0, 1) that depends only on the document's id."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64


def assign_splits(docs: list[Document], valid_fraction: float, test_fraction: float) -> list[Document]:
    """Split by document hash; a corpus of one document is split by position instead (train, then valid, then
    test, cut at character offsets like nanoGPT), giving up to three documents ``ID[train]`` and so on."""
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError("--valid-fraction and --test-fraction must be >= 0 and sum to less than 1")
    if len(docs) == 1:
        doc = docs[0]
        n = len(doc.text)
        cut_valid = int(n * (1 - valid_fraction - test_fraction))
        cut_test = int(n * (1 - test_fraction))
        pieces = [("train", 0, cut_valid), ("valid", cut_valid, cut_test), ("test", cut_test, n)]
        return [Document(f"{doc.doc_id}[{s}]", doc.text[a:b], s) for s, a, b in pieces if b > a]
    for doc in docs:
        h = hash_fraction(doc.doc_id)
        doc.split = "valid" if h < valid_fraction else "test" if h < valid_fraction + test_fraction else "train"
    return docs


def read_split_file(path: str) -> dict[str, str]:
    """A TSV or CSV with a file column (``file``, ``path`` or ``doc_id``) and a split column
    (``split`` or ``suggested_split``). Returns doc_id (or basename) -> split."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"split file {p} does not exist")
    with p.open(newline="", encoding="utf-8") as f:
        sample = f.read(4096)
        f.seek(0)
        delimiter = "\t" if "\t" in sample.splitlines()[0] else ","
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = reader.fieldnames or []
        file_col = next((c for c in ("file", "path", "doc_id", "filename") if c in fields), None)
        split_col = next((c for c in ("split", "suggested_split") if c in fields), None)
        if file_col is None or split_col is None:
            raise ValueError(f"split file {p} needs a file column and a split column; it has {fields}")
        mapping = {}
        for row in reader:
            split = row[split_col].strip().lower()
            split = {"validation": "valid", "val": "valid", "dev": "valid"}.get(split, split)
            if split not in SPLITS:
                raise ValueError(f"split file {p}: {row[file_col]!r} has split {row[split_col]!r}, not train/valid/test")
            mapping[row[file_col].strip()] = split
    return mapping


def apply_split_file(docs: list[Document], mapping: dict[str, str]) -> list[Document]:
    """Give each document the split its row names; match on the id, else on the file name."""
    missing = []
    for doc in docs:
        split = mapping.get(doc.doc_id) or mapping.get(Path(doc.doc_id).name)
        if split is None:
            missing.append(doc.doc_id)
        else:
            doc.split = split
    if missing:
        raise ValueError(f"{len(missing)} documents are not in the split file, e.g. {missing[0]!r}")
    return docs
