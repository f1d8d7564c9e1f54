"""Files written whole or not at all, by any number of processes at once."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file of its own in `path`'s folder (hidden, so a half-written file never passes for `path`) for the
    block to write; renamed over `path` when the block ends, removed if it raises. A reader never sees half a file,
    and writers at once never share a temporary file (a fixed name did: two engines loading one model at once both
    saved its cost curve, and one rename failed). Same folder: the rename is atomic, never a copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private; what we write reads like any file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole (see `replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text)
