"""Deterministic train/validation split of documents by their source name.

Each document's side is a pure function of (seed, source): a SHA-256 hash, not Python's
salted hash(), so it does not depend on the reading order, on which worker reads the
document, or on PYTHONHASHSEED.
"""

from __future__ import annotations

import hashlib


def split_fraction(source: str, seed: int) -> float:
    """A number in [0, 1) that is uniform over sources and fixed by (seed, source)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{source}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_validation(source: str, seed: int, val_fraction: float) -> bool:
    """True if the document named `source` belongs to the validation split.

    About `val_fraction` of all sources land in validation; 0 sends none, 1 sends all.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    return split_fraction(source, seed) < val_fraction


def sampled(source: str, seed: int, keep: float) -> bool:
    """True if the document named `source` is in a `keep`-fraction sample of the corpus.

    Hashed with its own salt, so the sample is independent of the train/validation split."""
    return keep >= 1.0 or split_fraction(f"sample\x00{source}", seed) < keep
