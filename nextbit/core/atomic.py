"""Atomic writes: write beside the target, then rename, so readers never see a half-written file.

Modes: what these write gets the modes a plain `open()` / `mkdir()` would give under the process's umask (files
0o666 & ~umask, folders 0o777 & ~umask: 0644 / 0755 under the usual 022), so a teammate or a server running as
another user reads a checkpoint as it reads any other file. Temporary files from mkstemp, and the files of writers
that go through one (safetensors 0.8 writes weights that way), start at 0600; `atomic_path` and `atomic_dir` set
them right before the rename.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where the system tells (Linux: /proc/self/status). Elsewhere it
    is read by setting it, under a lock, to the strictest value for the instant before it is put back, so a file
    another thread creates in that instant is never more open than it should be."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def file_mode() -> int:
    """The mode of a new regular file: 0o666 & ~umask."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode of a new folder: 0o777 & ~umask."""
    return 0o777 & ~umask()


def set_created_modes(root: Path) -> None:
    """Give `root` (a file or a folder, and everything under it) the modes plain creation gives: files 0o666 & ~umask
    (0o777 & ~umask when their owner may execute them), folders 0o777 & ~umask."""
    mask = umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode):
            os.chmod(p, 0o777 & ~mask)
        elif stat.S_ISREG(st.st_mode):
            os.chmod(p, (0o777 if st.st_mode & stat.S_IXUSR else 0o666) & ~mask)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it is renamed onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # a writer may have replaced it (through its own temporary file)
            set_created_modes(tmp_path)
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `target` as a whole. On failure (in the body or in the
    swap) the temporary directory is removed and `target` is left as it was. Everything in it gets the modes of plain
    creation under the umask (see the module docstring) before it is swapped in."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        set_created_modes(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
