"""Atomic writes: a file or a whole folder is written beside its target, fsynced, then renamed into place.

A reader (or a crash) sees the old file or folder or the new one, never a half-written one. Every
writer of the project goes through these two: :func:`atomic_write` for one file, :func:`atomic_dir`
for a folder (adapters, merged models, GGUF exports, training checkpoints, caches).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import QloraGaError


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[IO], None]) -> Path:
    """Write ``data`` (text, bytes, or a function that writes to a binary file object) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Write a folder atomically: ``with atomic_dir(out) as tmp:`` fill ``tmp`` (an empty folder ``.<name>.tmp-XXXX``
    beside ``out``).

    When the block completes, everything in ``tmp`` is fsynced and ``tmp`` is renamed to ``out``; an
    existing ``out`` is replaced only then (or, with ``keep_existing``, kept and ``tmp`` dropped: a
    cache that another process filled first). When the block raises, ``tmp`` is removed and ``out``
    is left as it was. The folder gets the usual permissions (``mkdtemp`` makes it private, 0700).
    """
    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise QloraGaError(f"output path '{out}' exists and is not a folder: choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QloraGaError(f"cannot create the parent folder of '{out}': {e.strerror or e}") from None
    if not keep_existing:  # what an earlier, killed write of this folder left (a cache may be filled concurrently)
        clean_stale(out.parent, lambda name: name == out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # like a folder made by mkdir
    try:
        yield tmp
        _fsync_tree(tmp)
        if keep_existing and out.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        _swap_in(tmp, out)
        _fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and deleted once ``tmp`` is in place."""
    old = None
    try:
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """fsync every file below ``folder``, then the folders themselves (their entries)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(root) / name)
    for root, dirs, _ in os.walk(folder, topdown=False):
        for name in dirs:
            _fsync_path(Path(root) / name)
    _fsync_path(folder)


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# tempfile's names: 8 characters of [a-z0-9_] (mkdtemp / mkstemp)
_STALE_TMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp-[a-z0-9_]{8}|[a-z0-9_]{8}\.tmp)$")  # atomic_dir's / atomic_write's
_STALE_OLD = re.compile(r"^\.(?P<name>.+)\.old-[a-z0-9_]{8}$")  # _swap_in's previous version


def clean_stale(folder: str | os.PathLike, ours: Callable[[str], bool]) -> list[str]:
    """Remove what writes killed mid-way (SIGKILL, power loss) left in ``folder``: the temporary folders and files
    of :func:`atomic_dir` / :func:`atomic_write`. A previous version moved aside by a swap that never completed
    is put back where it was. Only names of these two writers' patterns whose target the caller writes
    (``ours(target name)``) are touched: anything else in ``folder`` is not the tool's. Returns what was done."""
    folder = Path(folder)
    done = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        old, tmp = _STALE_OLD.match(p.name), _STALE_TMP.match(p.name)
        match = old or tmp
        if match is None or not ours(match.group("name")):
            continue
        if old and p.is_dir():
            target = folder / old.group("name")
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p.name}")
            else:  # killed between moving the old version aside and renaming the new one in: the old one is it
                os.replace(p, target)
                done.append(f"restored {target.name}")
        elif tmp:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            done.append(f"removed {p.name}")
    return done


def nearest_folder(path: str | os.PathLike) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (where ``path`` would be created)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def probe_write(folder: str | os.PathLike) -> None:
    """Write a temporary file in ``folder`` and remove it: an ``OSError`` now rather than after hours of work."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
    os.close(fd)
    os.unlink(probe)
