"""Damaging a checkpoint the way a full disk or a bad copy would."""

from __future__ import annotations

from pathlib import Path


def damage(workdir: str | Path, step: int, how: str) -> Path:
    """Truncate to half (`truncated`) or delete (`missing`) the biggest array data file of checkpoint
    `step` in `workdir`; returns that file's path."""
    files = list((Path(workdir) / "checkpoints" / str(step) / "state" / "d").iterdir())
    big = max(files, key=lambda p: p.stat().st_size)
    if how == "truncated":
        big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    elif how == "missing":
        big.unlink()
    else:
        raise ValueError(f"how must be truncated or missing, got {how!r}")
    return big
