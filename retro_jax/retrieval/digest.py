"""SHA-256 of files: what manifests, resume records and the embedder's name identify data by.

Kept apart from database.py so the embedder (bert.py, which database.py loads lazily) can use it
without an import cycle.
"""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
