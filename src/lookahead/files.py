"""Files written whole or not at all, by any number of processes at once."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file of its own in the same folder, then rename it over `path`:
    a reader never sees half a file, and writers at once never share a temporary file (a fixed name did: two
    engines loading one model at once both saved its cost curve, and one rename failed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
