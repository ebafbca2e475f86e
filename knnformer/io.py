"""Writing files and folders so that a crash never leaves half of one: every artefact is written under a
temporary name beside its final one and renamed into place when complete; checksums of what was written.

- ``writing_file(path)`` / ``writing_folder(path)``: context managers that hand out the temporary name and, when
  the block ends without an exception, rename it into place (a folder that exists is swapped out and removed
  only after the new one is in place); on an exception the temporary is removed and ``path`` is untouched.
- ``atomic_write_text(path, text)``: one text file, the same way.
- Temporaries left by a process that no longer runs (killed before it could clean up) are removed the next time
  anything is written to the same name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path_size(path: str | Path) -> int:
    """Bytes of a file, or of all files under a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def tmp_path(path: Path) -> Path:
    """A temporary name beside ``path``, renamed into place with ``os.replace`` once complete. Temporaries of
    ``path`` left by a process that no longer runs (killed before it could clean up) are removed first."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(stale)
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def writing_file(path: str | Path) -> Iterator[Path]:
    """``with writing_file(p) as tmp: write tmp`` -> ``p`` replaced by ``tmp`` at the end, or untouched on error."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def writing_folder(path: str | Path) -> Iterator[Path]:
    """``with writing_folder(p) as tmp: fill tmp`` -> the folder ``tmp`` (made empty) becomes ``p`` at the end; a
    folder already at ``p`` is moved aside first and removed once the new one is in place. On an exception ``p``
    keeps what it had and ``tmp`` is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with writing_file(path) as tmp:
        tmp.write_text(text)
