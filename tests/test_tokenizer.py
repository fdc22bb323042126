"""The tokenizer is lossless and its byte table counts UTF-8 bytes exactly."""

import hashlib
import random

import numpy as np
import pytest

from retro_jax.data.tokenizer import (
    Tokenizer,
    TokenizerError,
    TokenizerNotFoundError,
    train_tokenizer,
)

VOCAB = 400

TRICKY = [
    "",
    "def f(x):\n    return x  # comment\n\n\n\tif y:\r\n        pass\n",
    "   leading and trailing spaces   ",
    "tabs\tand\t\tspaces  \t  mixed\n\n",
    "unicode: héllo wörld, Ελληνικά, 日本語, עברית, emoji 😀🚀👨‍👩‍👧",
    "the literal block \u2581 char \u2581\u2581 and \u2581 at ends\u2581",
    "\u2581",
    "digits 1234567890 3.14159 0xDEADBEEF",
    "control \x00 \x01 \x7f and nbsp\u00a0ideographic\u3000space",
    "<s> </s> <pad> <unk> <0x41> look like specials but are text",
    "\n",
    " ",
    "\u200b zero width, \ufeff bom, combining e\u0301",
]


def _corpus(n_docs: int = 150, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["def", "return", "self", "import", "value", "data", "the", "of", "chunk",
             "retrieval", "token", "naïve", "café", "数据", "x", "y", "if", "for", "in"]
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(3, 12)):
            indent = " " * (4 * rng.randint(0, 3))
            body = " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
            lines.append(indent + body + rng.choice(["", ":", "()", " = 12", "  # 7"]))
        docs.append("\n".join(lines) + "\n")
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "sp"
    return train_tokenizer(_corpus(), str(out), vocab_size=VOCAB, seed=0)


def _random_text(rng: random.Random, n: int) -> str:
    """Random code points from all planes, surrogates excluded (not encodable)."""
    chars = []
    for _ in range(n):
        r = rng.random()
        if r < 0.4:
            cp = rng.randint(0x20, 0x7E)
        elif r < 0.5:
            cp = rng.choice([0x0A, 0x09, 0x0D, 0x20, 0x2581, 0x00])
        else:
            cp = rng.randint(0x80, 0x10FFFF)
            if 0xD800 <= cp <= 0xDFFF:
                cp = 0x41
        chars.append(chr(cp))
    return "".join(chars)


def test_round_trip_is_lossless_and_bytes_add_up(tok):
    rng = random.Random(1)
    texts = TRICKY + _corpus(20, seed=7) + [_random_text(rng, 200) for _ in range(50)]
    num_bytes = tok.token_num_bytes()
    assert num_bytes.dtype == np.int32 and num_bytes.shape == (tok.vocab_size,)
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(num_bytes[ids].sum()) == len(text.encode("utf-8"))
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.pad_id not in ids


def test_batch_encoding_matches_single(tok):
    texts = TRICKY + _corpus(10, seed=3)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert list(tok.iter_encode(iter(texts), batch_size=4)) == [tok.encode(t) for t in texts]


def test_special_ids_and_their_byte_counts(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert list(tok.token_num_bytes()[:4]) == [0, 0, 0, 0]
    # Masked (-1) and control ids decode to nothing.
    ids = tok.encode("abc")
    assert tok.decode([tok.bos_id, -1, *ids, tok.eos_id, tok.pad_id, -1]) == "abc"


def test_code_structure_is_compact(tok):
    # A newline is one token; an indented line costs fewer tokens than its characters.
    assert len(tok.encode("\n")) == 1
    text = "        return value\n"
    assert len(tok.encode(text)) < len(text) // 2


def test_load_and_training_are_reproducible(tok, tmp_path):
    loaded = Tokenizer.load(tok.model_path)
    with open(tok.model_path, "rb") as f:
        assert loaded.sha256 == tok.sha256 == hashlib.sha256(f.read()).hexdigest()
    assert loaded.encode(TRICKY[1]) == tok.encode(TRICKY[1])
    again = train_tokenizer(_corpus(), str(tmp_path / "again"), vocab_size=VOCAB, seed=0)
    assert again.sha256 == tok.sha256


def test_sampling_bounds_the_training_input(tmp_path):
    # Only 50 lines are kept; the model still trains and stays lossless.
    small = train_tokenizer(_corpus(), str(tmp_path / "s"), vocab_size=300, seed=0,
                            input_sentence_size=50)
    assert small.decode(small.encode(TRICKY[4])) == TRICKY[4]


def test_bad_inputs_raise_clear_errors(tmp_path, tok):
    with pytest.raises(TokenizerNotFoundError, match="not found"):
        Tokenizer.load(str(tmp_path / "missing.model"))
    with pytest.raises(TokenizerError, match="no non-empty"):
        train_tokenizer(["", "   \n\n"], str(tmp_path / "empty"), vocab_size=300)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(TokenizerError):
        Tokenizer.load(str(garbage))
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([tok.vocab_size])
