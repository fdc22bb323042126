"""13-gram MinHash dedup flags copies and light edits of validation docs, nothing else."""

import random

import pytest

from retro_jax.data.dedup import NearDuplicateFilter, exact_jaccard, word_shingles

VOCAB = [f"w{i}" for i in range(2000)]


def _doc(rng: random.Random, n_words: int = 500) -> str:
    words = [rng.choice(VOCAB) for _ in range(n_words)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, n_words, 12)]
    return "\n".join(lines)


def _edit(rng: random.Random, text: str, n_changes: int) -> str:
    words = text.split()
    for pos in rng.sample(range(len(words)), n_changes):
        words[pos] = "EDITED"
    return " ".join(words)


@pytest.fixture(scope="module")
def refs():
    rng = random.Random(0)
    docs = [_doc(rng) for _ in range(30)]
    f = NearDuplicateFilter(threshold=0.8, ngram=13, num_perm=128, seed=0)
    for i, d in enumerate(docs):
        f.add_reference(100 + i, d)
    return f, docs


def test_copies_and_light_edits_are_flagged(refs):
    f, docs = refs
    rng = random.Random(1)
    for i, d in enumerate(docs):
        assert f.find_near_duplicate(d) == 100 + i
        reflowed = " ".join(d.split())  # same words, other whitespace
        assert f.find_near_duplicate(reflowed) == 100 + i
        edited = _edit(rng, d, n_changes=2)
        assert exact_jaccard(edited, d) >= 0.85  # the premise: a light edit
        assert f.find_near_duplicate(edited) == 100 + i


def test_unrelated_and_partial_overlaps_are_kept(refs):
    f, docs = refs
    rng = random.Random(2)
    for d in docs[:10]:
        assert not f.is_near_duplicate(_doc(rng))
        words = d.split()
        half_copy = " ".join(words[:250]) + " " + _doc(rng, 250)
        assert exact_jaccard(half_copy, d) < 0.5
        assert not f.is_near_duplicate(half_copy)
        heavy = _edit(rng, d, n_changes=40)
        assert exact_jaccard(heavy, d) < 0.5
        assert not f.is_near_duplicate(heavy)


def test_minhash_estimates_exact_jaccard():
    rng = random.Random(3)
    f = NearDuplicateFilter(seed=0)
    base = _doc(rng, 800)
    for n_changes in [0, 3, 10, 30]:
        other = _edit(rng, base, n_changes)
        assert abs(f.similarity(base, other) - exact_jaccard(base, other)) < 0.12


def test_short_documents_use_one_shingle():
    assert word_shingles("a b  c\n", 13) == [b"a b c"]
    assert len(word_shingles(" ".join(map(str, range(20))), 13)) == 8
    f = NearDuplicateFilter(seed=0)
    f.add_reference(0, "print('hello world')")
    f.add_reference(1, "   ")
    assert f.is_near_duplicate("print('hello world')\n")
    assert not f.is_near_duplicate("print('goodbye world')")
    assert not f.is_near_duplicate("")
    assert (f.stats.references, f.stats.skipped_empty) == (1, 1)
    assert (f.stats.checked, f.stats.flagged) == (3, 1)


def test_same_seed_same_signatures_and_bad_arguments():
    text = _doc(random.Random(4))
    a, b = NearDuplicateFilter(seed=7), NearDuplicateFilter(seed=7)
    assert (a.minhash(text).hashvalues == b.minhash(text).hashvalues).all()
    with pytest.raises(ValueError, match="already added"):
        a.add_reference(5, text)
        a.add_reference(5, text)
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicateFilter(threshold=0.0)
