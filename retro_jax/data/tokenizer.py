"""SentencePiece tokenizer: training from a text iterator, loading, lossless encode/decode.

The model is trained so that `decode(encode(t)) == t` for EVERY string t:
identity normalization, no dummy prefix, whitespace kept as is (runs of spaces become
whitespace-only pieces, so Python indentation is cheap), "\\n" is its own piece, digits
are split, and any character outside the vocabulary falls back to its UTF-8 bytes.

One SentencePiece quirk is handled here rather than in the model: SentencePiece writes
spaces as U+2581 '▁', so a literal '▁' in the input would come back as a space. `encode`
therefore emits a literal '▁' as its three byte-fallback pieces, and `decode` joins the
UTF-8 bytes of each piece itself (the same table `token_num_bytes` sums), so the round
trip and the byte counts are exact.

Special ids: pad=0, unk=1, bos=2, eos=3.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MIN_VOCAB = 4 + 1 + 256 + 4
SPACE_SYMBOL = "\u2581"
_SPACE_SYMBOL_BYTES = SPACE_SYMBOL.encode("utf-8")


class TokenizerError(ValueError):
    """Bad tokenizer input: no training text, unreadable model, bad ids."""


class TokenizerNotFoundError(FileNotFoundError):
    """The SentencePiece .model file does not exist."""


def _sample_lines(
    texts: Iterable[str], max_lines: int, seed: int, progress: bool = True
) -> tuple[list[str], int]:
    """Seeded reservoir sample of at most max_lines non-empty lines from all texts."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for text in tqdm(texts, desc="tokenizer: sampling lines", unit="doc", disable=not progress):
        for line in text.split("\n"):
            if not line.strip():
                continue
            seen += 1
            if len(sample) < max_lines:
                sample.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_lines:
                    sample[j] = line
    return sample, seen


def train_tokenizer(
    texts: Iterable[str],
    out_prefix: str,
    vocab_size: int = 8192,
    seed: int = 0,
    max_sentence_length: int = 4192,
    input_sentence_size: int = 100_000,
    model_type: str = "unigram",
    num_threads: int = 2,
    progress: bool = True,
) -> "Tokenizer":
    """Train a lossless SentencePiece model on texts and write `out_prefix + ".model"`.

    Training sentences are the non-empty lines of the texts; a seeded reservoir sample
    of at most `input_sentence_size` lines is kept (so memory and time stay bounded),
    and lines longer than `max_sentence_length` bytes are ignored by SentencePiece.
    The same texts, seed and settings (num_threads included) give a byte-identical
    model file.
    """
    if vocab_size < MIN_VOCAB:
        raise TokenizerError(
            f"vocab_size must be at least {MIN_VOCAB} (4 specials, newline, 256 byte pieces "
            f"and a few characters), got {vocab_size}"
        )
    lines, seen = _sample_lines(texts, input_sentence_size, seed, progress)
    if not lines:
        raise TokenizerError("no non-empty text lines to train the tokenizer on")
    lines.sort()  # reservoir order depends on arrival; sorting makes the input canonical
    random.Random(seed).shuffle(lines)
    log.info("training SentencePiece (%s, vocab %d) on %d of %d lines (about 40 s per 100k)",
             model_type, vocab_size, len(lines), seen)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n"],
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            character_coverage=0.9995,
            max_sentence_length=max_sentence_length,
            input_sentence_size=0,  # we sampled already
            shuffle_input_sentence=False,
            hard_vocab_limit=False,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(f"SentencePiece training failed: {e}") from e
    path = out_prefix + ".model"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)
    tok = Tokenizer.load(path)
    log.info("wrote tokenizer %s (vocab %d, sha256 %s)", path, tok.vocab_size, tok.sha256[:12])
    return tok


class Tokenizer:
    """A loaded SentencePiece model with exact byte accounting."""

    def __init__(self, model_proto: bytes, model_path: str | None = None) -> None:
        self.model_path = model_path
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
            raise TokenizerError(f"not a SentencePiece model: {model_path}: {e}") from e
        if not (self._sp.pad_id() == PAD_ID and self._sp.unk_id() == UNK_ID
                and self._sp.bos_id() == BOS_ID and self._sp.eos_id() == EOS_ID):
            raise TokenizerError(f"{model_path}: expected special ids pad=0 unk=1 bos=2 eos=3")
        self._piece_bytes = [self._bytes_of(i) for i in range(self.vocab_size)]
        self._num_bytes = np.array([len(b) for b in self._piece_bytes], dtype=np.int32)
        byte_pieces = [f"<0x{b:02X}>" for b in _SPACE_SYMBOL_BYTES]
        self._space_symbol_ids = [self._sp.piece_to_id(p) for p in byte_pieces]
        if [self._sp.id_to_piece(i) for i in self._space_symbol_ids] != byte_pieces:
            raise TokenizerError(f"{model_path}: model lacks byte-fallback pieces (byte_fallback)")

    @classmethod
    def load(cls, model_path: str) -> "Tokenizer":
        """Load a .model file written by `train_tokenizer`."""
        if not os.path.isfile(model_path):
            raise TokenizerNotFoundError(f"tokenizer model not found: {model_path!r}")
        with open(model_path, "rb") as f:
            return cls(f.read(), model_path=model_path)

    def _bytes_of(self, i: int) -> bytes:
        sp = self._sp
        if sp.is_control(i) or sp.is_unknown(i):
            return b""
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SPACE_SYMBOL, " ").encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def token_num_bytes(self) -> np.ndarray:
        """int32 [vocab]: UTF-8 bytes each id decodes to (specials 0, byte pieces 1)."""
        return self._num_bytes.copy()

    def encode(self, text: str) -> list[int]:
        """Token ids of text (no bos/eos); `decode(encode(text)) == text` always."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """`encode` for many texts at once (SentencePiece's batch path)."""
        pieces: list[str] = []
        owners: list[int] = []
        for k, text in enumerate(texts):
            if not isinstance(text, str):
                raise TokenizerError(f"encode expects str, got {type(text).__name__}")
            parts = text.split(SPACE_SYMBOL)
            pieces.extend(parts)
            owners.extend([k] * len(parts))
        encoded = self._sp.encode(pieces, out_type=int, num_threads=num_threads)
        out: list[list[int]] = [[] for _ in texts]
        previous = -1
        for k, ids in zip(owners, encoded):
            if k == previous:  # a literal '▁' separated this part from the previous one
                out[k].extend(self._space_symbol_ids)
            out[k].extend(ids)
            previous = k
        return out

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ids; control ids and ids < 0 (masked positions) contribute nothing."""
        table = self._piece_bytes
        n = len(table)
        out = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i >= n:
                raise TokenizerError(f"token id {i} out of range for vocab {n}")
            if i >= 0:
                out.append(table[i])
        return b"".join(out).decode("utf-8", errors="replace")

    def iter_encode(self, texts: Iterable[str], batch_size: int = 256) -> Iterator[list[int]]:
        """Encode a stream of texts in batches, yielding one id list per text."""
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == batch_size:
                yield from self.encode_batch(batch)
                batch = []
        if batch:
            yield from self.encode_batch(batch)
