"""Stage records for build-db: settings checks, atomic JSON, and the errors a build raises.

Every stage records its settings and result in `NAME.json` ({settings, complete, result}); a
complete stage with the same settings is skipped, an incomplete one is redone, and one whose
settings differ is an error naming the setting unless `overwrite=True` (then its outputs are
removed and it is rebuilt). See `retro_jax.retrieval.build` for the stages themselves.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# The settings that decide which documents become which chunks (the chunks and combine stages).
# document_end: how a document's tokens end; "eos" (the only value this code writes): with the
# tokenizer's EOS id. A database built before it has none recorded, so its chunks hold no EOS.
CHUNK_KEYS = ("corpus", "max_documents", "val_fraction", "seed", "dedup", "chunk_size", "max_chunks", "num_workers",
              "document_end")
DOCUMENT_END = "eos"


def chunk_settings(s: dict[str, Any]) -> dict[str, Any]:
    """CHUNK_KEYS of the build settings `s`, and `sample_documents` only when it is below 1, so that a
    database built before the option existed still matches its settings."""
    out = {k: s[k] for k in CHUNK_KEYS}
    if s.get("sample_documents", 1.0) < 1.0:
        out["sample_documents"] = float(s["sample_documents"])
    return out


class BuildError(ValueError):
    """Bad build input, or an output folder holding a different database."""


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomic write (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def diff_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One 'key: built with X, this run asks for Y' line per differing setting."""
    return [f"{k}: built with {old.get(k)!r}, this run asks for {new.get(k)!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class Stage:
    """A stage's record file: {settings, complete, result}; see the module docstring."""

    def __init__(self, path: Path, outputs: list[Path], overwrite: bool, where: str) -> None:
        self.path, self.outputs, self.overwrite, self.where = path, outputs, overwrite, where

    def start(self, settings: dict[str, Any]) -> dict[str, Any] | None:
        """The recorded result if complete with these settings; else prepare a (re)run, None."""
        rec = read_json(self.path)
        if rec is not None:
            diff = diff_settings(rec["settings"], settings)
            if diff and not self.overwrite:
                raise BuildError(f"{self.where}: stage {self.path.stem} differs ({'; '.join(diff)}); "
                                 "pass --overwrite to rebuild it, or choose another --out")
            if not diff and rec.get("complete"):
                return rec["result"]
            if diff:
                log.warning("rebuilding stage %s (%s)", self.path.stem, "; ".join(diff))
                for out in self.outputs:
                    shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
                rec = None
        if rec is None:
            write_json(self.path, {"settings": settings, "complete": False})
        self.settings = settings
        return None

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        write_json(self.path, {"settings": self.settings, "complete": True, "result": result})
        return result


def slice_dir(root: Path, worker: int, num_workers: int) -> Path:
    return root / "slices" / f"w{worker}-of-{num_workers}"
