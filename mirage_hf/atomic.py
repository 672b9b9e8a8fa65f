"""Atomic writes of files and folders: written under a hidden name beside the target, then renamed over it, so a
reader (or a resumed run) finds the old version or the new one, never half of one."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_path(path: str | os.PathLike) -> Path:
    """The hidden sibling a file or folder is written under before `commit`; the same on every process of a run
    (they all write one checkpoint folder), and a leftover from a killed run is cleared by the next write."""
    path = Path(path)
    return path.with_name(f".tmp-{path.name}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(staging: str | os.PathLike, path: str | os.PathLike) -> None:
    """Renames `staging` over `path`. A folder cannot be renamed over a non-empty one, so an existing folder is
    first moved aside (a reader then briefly finds nothing, never a mixture) and removed afterwards."""
    staging, path = Path(staging), Path(path)
    if not path.is_dir():
        os.replace(staging, path)
        return
    previous = path.with_name(f".old-{path.name}")
    if previous.exists():
        _remove(previous)
    os.replace(path, previous)
    os.replace(staging, path)
    _remove(previous)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the staging path to write `path` under (as a file, or as a folder the block creates); commits it
    when the block succeeds and removes it when the block fails, leaving `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    _remove(staging)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    commit(staging, path)
