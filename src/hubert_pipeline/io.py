"""Atomic writes: a killed process never leaves a file that looks complete.

Every output of the pipeline goes through these helpers: the content is written to a temporary file in the
destination folder, flushed, then renamed over the destination (rename is atomic on POSIX file systems).
"""

import contextlib
import json
import os
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    """The process's umask. Reading it means setting it: done once, at import, before any worker thread starts
    (a thread creating a file between the two calls would get the wrong permissions)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Generator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_UMASK)  # mkstemp makes 0600 files: give outputs the usual permissions
    try:
        yield tmp_path
        with tmp_path.open("rb+") as f:
            os.fsync(f.fileno())
        tmp_path.replace(path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Generator[IO[Any]]:
    """Open a temporary file for writing; it replaces `path` only when the block exits without error."""
    with atomic_path(path) as tmp, tmp.open(mode, encoding=None if "b" in mode else encoding) as f:
        yield f


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def project_root(path: str | Path) -> Path | None:
    """The pipeline folder a file at `path` belongs to (the nearest folder above it holding dvc.yaml), against which
    its manifest's relative paths resolve (`manifest.relative_sources`); None outside a pipeline."""
    for folder in Path(path).resolve().parents:
        if (folder / "dvc.yaml").is_file():
            return folder
    return None
