"""Real text for the benchmarks: Python source, cut into RETRO-chunk-sized pieces.

Documents come in a fixed order: the standard library (the build-db default corpus, tests
excluded), then every .py file under this interpreter's site-packages (sorted by path, test
folders excluded). Both are real, present on every machine that runs the project, and large
(about 12 MB and 100+ MB here).

A chunk text is what build-db embeds: 64 SentencePiece tokens decoded back to text when a
tokenizer is given (e.g. a database's tokenizer.model), else `chars` characters (250 characters
of Python source is about 64 tokens of the stdlib-trained 8192-piece vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from retro_jax.data.corpus import iter_documents

EXCLUDED_DIRS = frozenset({"test", "tests", "__pycache__"})


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def documents(include_site_packages: bool = True) -> Iterator[tuple[str, str]]:
    """(source, text) of the stdlib corpus, then of site-packages .py files; deterministic."""
    for doc in iter_documents(None):
        yield doc.source, doc.text
    if not include_site_packages:
        return
    root = site_packages()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    for path in sorted(files):
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield "<site-packages>/" + os.path.relpath(path, root), text


def chunk_texts(n: int, chars: int = 250, tokenizer: str | None = None, chunk_tokens: int = 64,
                seed: int = 0) -> list[str]:
    """n distinct chunk texts from `documents()` in order (full chunks only), then shuffled with
    `seed` so any held-out tail (bench/retrieval.py's queries) is a random sample of them.
    Exact duplicate texts (vendored copies, licence headers) are kept once."""
    tok = None
    if tokenizer is not None:
        from retro_jax.data.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer)
    seen: set[bytes] = set()
    texts: list[str] = []
    for _, text in documents():
        if tok is None:
            pieces = (text[i:i + chars] for i in range(0, len(text) - chars + 1, chars))
        else:
            ids = tok.encode(text)
            pieces = (tok.decode(ids[i:i + chunk_tokens]) for i in range(0, len(ids) - chunk_tokens + 1, chunk_tokens))
        for piece in pieces:
            key = hashlib.blake2b(piece.encode("utf-8", errors="replace"), digest_size=16).digest()
            if key in seen:
                continue
            seen.add(key)
            texts.append(piece)
            if len(texts) == n:
                order = np.random.default_rng(seed).permutation(n)
                return [texts[i] for i in order]
    raise ValueError(f"stdlib + site-packages hold only {len(texts)} distinct chunk texts; asked for {n}")


def texts_sha256(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", errors="replace") + b"\0")
    return h.hexdigest()


def write_jsonl(path: Path, target_bytes: int) -> dict[str, int]:
    """Write `documents()` as JSONL ({"text": ...}) until about target_bytes of text; returns counts."""
    docs = size = 0
    with open(path, "w", encoding="utf-8") as f:
        for source, text in documents():
            f.write(json.dumps({"text": text, "source": source}) + "\n")
            docs += 1
            size += len(text.encode("utf-8"))
            if size >= target_bytes:
                break
    return {"documents": docs, "bytes": size}
