"""Writing files and folders so that a crash never leaves half of one: every artefact is written under a
temporary name beside its final one and renamed into place when complete; checksums of what was written.

- ``writing_file(path)`` / ``writing_folder(path)``: context managers that hand out the temporary name and, when
  the block ends without an exception, rename it into place (a folder that exists is swapped out and removed
  only after the new one is in place); on an exception the temporary is removed and ``path`` is untouched.
- ``atomic_write_text(path, text)``: one text file, the same way.
- Temporaries left by a process that no longer runs (killed before it could clean up) are removed the next time
  anything is written to the same name, and by ``claim_folder`` for a whole folder.
- ``claim_folder(path, command)``: one writer per folder. An exclusive ``fcntl.flock`` on ``.NAME.lock`` beside the
  folder, released by the OS when the process ends however it ends; a second writer gets a one-line error naming
  the holder's pid. Readers take no lock.
- ``checked_sha256(path, expected)``: a file's content checked against a recorded sha256, cached in a stamp
  beside it so that an unchanged file (same inode, size and ctime) is not read again.
- ``describe_os_error(e)``: an ``OSError`` as one line naming the file and the fix.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self


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
    for stale in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
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
        with _naming(path):
            yield tmp
        _readable(tmp)
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
    recover_swapped_folder(path)
    tmp = tmp_path(path)
    _remove(tmp)
    tmp.mkdir()
    try:
        with _naming(path):
            yield tmp
        for f in tmp.rglob("*"):
            _readable(f)
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


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Give an OSError raised while writing ``path`` the name of what was being written when it has none (numpy's
    short write on a full disk says only "N requested and M written")."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        short = "requested and" in str(e) and "written" in str(e)
        raise OSError(errno.ENOSPC if short and e.errno is None else (e.errno or errno.EIO),
                      e.strerror or str(e), str(path)) from e
    except Exception as e:  # writers in other languages (safetensors' Rust, torch's C++) report the OS's error
        found = re.search(r"os error (\d+)", str(e))
        code = int(found.group(1)) if found else next(
            (c for c, words in _WRITE_ERRORS.items() if any(w in str(e) for w in words)), None)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from e


_WRITE_ERRORS = {errno.ENOSPC: ("No space left", "failed writing file", "file write failed"),
                 errno.EFBIG: ("File too large",)}


def atomic_write_text(path: str | Path, text: str) -> None:
    with writing_file(path) as tmp:
        tmp.write_text(text)


def _readable(path: Path) -> None:
    """Give a file the mode an ordinary ``open`` would (0644 under the usual umask): some writers (safetensors)
    create 0600 files, which a teammate could not read."""
    if path.is_file() and not path.is_symlink():
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
        if stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)


# ---------------------------------------------------------------- temporaries of dead processes

TEMP_MARKERS = (".tmp-", ".old-")


def _temp_pid(name: str) -> int | None:
    """The pid in a temporary's name (``.NAME.tmp-PID``, ``.NAME.old-PID``), or None for any other name."""
    if not name.startswith("."):
        return None
    for marker in TEMP_MARKERS:
        head, sep, pid = name.rpartition(marker)
        if sep and head and pid.isdigit():
            return int(pid)
    return None


def remove_dead_temporaries(folder: str | Path, depth: int = 2) -> list[Path]:
    """Remove the temporaries (``.NAME.tmp-PID``, ``.NAME.old-PID``) under ``folder`` (``depth`` levels) whose
    process no longer runs; returns what was removed. A kill -9 leaves them; nothing else would."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        pid = _temp_pid(entry.name)
        if pid is not None:
            if pid != os.getpid() and not _alive(pid):
                _remove(entry)
                removed.append(entry)
        elif depth > 1 and entry.is_dir() and not entry.is_symlink():
            removed += remove_dead_temporaries(entry, depth - 1)
    return removed


# ---------------------------------------------------------------- one writer per folder

class FolderClaim:
    """An exclusive lock on a folder (see ``claim_folder``), released by ``release()``, by garbage collection,
    or by the OS when the process ends."""

    def __init__(self, path: Path, lock_path: Path, fd: int):
        self.path, self.lock_path, self.fd = path, lock_path, fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def lock_path_of(path: str | Path) -> Path:
    path = Path(path).resolve()
    return path.parent / f".{path.name}.lock"


def claim_folder(path: str | Path, command: str) -> FolderClaim:
    """Become the only writer of the folder ``path`` (made if missing, with its parents): take an exclusive flock
    on ``.NAME.lock`` beside it, then remove the temporaries dead processes left in and beside it. A second
    writer gets a ValueError naming the holder's pid and command. Keep the returned claim alive while writing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a folder; pick another --out (or remove the file)")
    lock = lock_path_of(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ValueError(f"{path} is being written by {holder}; wait for it to finish or pick another "
                             f"folder (one writer per folder)") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} (`knnformer {command}`)\n".encode(), 0)
    claim = FolderClaim(path, lock, fd)
    recover_swapped_folder(path)
    remove_dead_temporaries(path)
    for entry in lock.parent.glob(f".{glob_escape(path.resolve().name)}.*"):
        pid = _temp_pid(entry.name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            _remove(entry)
    return claim


def recover_swapped_folder(path: str | Path) -> None:
    """Undo a swap ``writing_folder`` did not finish: a process killed between moving the old folder aside
    (``.NAME.old-PID``) and renaming the new one into place left no ``path``; move the old one back."""
    path = Path(path)
    if path.exists():
        return
    for old in sorted(path.parent.glob(f".{glob_escape(path.name)}.old-*")):
        pid = _temp_pid(old.name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            os.replace(old, path)
            return


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


# ---------------------------------------------------------------- content checks

def checked_sha256(path: str | Path, expected: str, name: str | None = None, also=None) -> None:
    """Raise ValueError unless ``path``'s sha256 is ``expected``. The result is remembered in a stamp file
    (``.NAME.checked``) keyed by inode, size and ctime (which every write changes and no tool can set back), so
    an unchanged file is read once, not on every open. The stamp is best effort: a read-only folder re-reads.
    ``also()``, when given, runs with the hash (further checks of the content, raising ValueError), and only then."""
    path = Path(path)
    st = path.stat()
    key = {"ino": st.st_ino, "size": st.st_size, "ctime_ns": st.st_ctime_ns, "sha256": expected}
    stamp = path.parent / f".{path.name}.checked"
    try:
        if json.loads(stamp.read_text()) == key:
            return
    except (OSError, ValueError):
        pass
    if file_sha256(path) != expected:
        raise ValueError(f"{path} does not match the sha256 recorded when it was written (changed or corrupt "
                         f"since); rebuild it{f' with {name}' if name else ''}")
    if also is not None:
        also()
    try:
        atomic_write_text(stamp, json.dumps(key))
    except OSError:
        pass


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: what happened, to which file, and what to do."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"no space left (or file too large) while writing{where or ' a file'}: {e.strerror}; nothing "
                f"half-written was kept: free space and run it again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {e.strerror}; pick a folder you can write to, or fix its permissions"
    if e.errno == errno.ENOTDIR:
        return f"{e.filename or 'a path'} has a file where a folder is needed ({e.strerror}); pick another path"
    if e.errno == errno.EEXIST:
        return f"{e.filename or 'a path'} already exists and is not a folder; pick another path"
    if e.errno == errno.EISDIR:
        return f"{e.filename or 'a path'} is a folder where a file is needed; pick another path"
    if e.errno == errno.ENOENT:
        return f"no such file or folder:{where or ' (unnamed)'}"
    return f"{e.strerror or e}{':' + where if where else ''}"
