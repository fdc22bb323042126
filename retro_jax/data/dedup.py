"""Train/test near-duplicate removal with 13-gram MinHash (RETRO Section 2.6 / C.1).

The paper drops training documents whose 13-gram Jaccard similarity to any evaluation
document is >= 0.8, estimated with MinHash. Shingles here are WORD 13-grams: the text
is split on whitespace (str.split()) and every 13 consecutive words, joined by one
space, form one shingle, so re-wrapping lines or re-indenting does not hide a copy.
A document with fewer than 13 words becomes a single shingle (its whole word sequence).

Candidates come from a datasketch MinHashLSH index over the reference (validation)
documents; each candidate is then confirmed with the MinHash Jaccard estimate, so a
document is flagged exactly when its estimated similarity to some reference is
>= threshold. The LSH bands are chosen for recall, not balance: a pair at the
threshold becomes a candidate with probability >= 0.9999 (datasketch's balanced
default misses about 60% of pairs at J = 0.8, which would leak test data).
"""

from __future__ import annotations

import dataclasses

from datasketch import LeanMinHash, MinHash, MinHashLSH


@dataclasses.dataclass
class DedupStats:
    """references: reference documents indexed; checked / flagged: queries and hits;
    skipped_empty: texts without any word (never indexed, never flagged)."""

    references: int = 0
    checked: int = 0
    flagged: int = 0
    skipped_empty: int = 0


def lsh_params(threshold: float, num_perm: int, recall: float = 0.9999) -> tuple[int, int]:
    """(bands, rows): the most selective banding whose candidate probability at
    Jaccard = threshold, 1 - (1 - threshold**rows)**bands, is at least `recall`."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def word_shingles(text: str, ngram: int) -> list[bytes]:
    """The distinct word n-grams of text, UTF-8 encoded; short texts give one shingle."""
    words = text.split()
    if not words:
        return []
    if len(words) <= ngram:
        return [" ".join(words).encode("utf-8")]
    grams = {" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)}
    return [g.encode("utf-8") for g in grams]


class NearDuplicateFilter:
    """Flags texts that are near-duplicates of any reference (validation) document."""

    def __init__(
        self, threshold: float = 0.8, ngram: int = 13, num_perm: int = 128, seed: int = 1
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if ngram < 1 or num_perm < 2:
            raise ValueError(f"need ngram >= 1 and num_perm >= 2, got {ngram}, {num_perm}")
        self.threshold = threshold
        self.ngram = ngram
        self.num_perm = num_perm
        self.seed = seed
        self.stats = DedupStats()
        self._lsh = MinHashLSH(num_perm=num_perm, params=lsh_params(threshold, num_perm))
        self._refs: dict[int, LeanMinHash] = {}
        # Hash permutations depend only on (num_perm, seed): draw them once, reuse.
        template = MinHash(num_perm=num_perm, seed=seed)
        self._scheme = template.scheme
        self._permutations = template.permutations

    def minhash(self, text: str) -> LeanMinHash | None:
        """The MinHash signature of text's word n-grams (None if it has no words)."""
        shingles = word_shingles(text, self.ngram)
        if not shingles:
            return None
        m = MinHash(
            num_perm=self.num_perm,
            seed=self.seed,
            permutations=self._permutations,
            scheme=self._scheme,
        )
        m.update_batch(shingles)
        return LeanMinHash(m)

    def add_reference(self, doc_id: int, text: str) -> None:
        """Index a validation document; training texts are compared against these."""
        doc_id = int(doc_id)
        if doc_id in self._refs:
            raise ValueError(f"reference doc_id {doc_id} was already added")
        signature = self.minhash(text)
        if signature is None:
            self.stats.skipped_empty += 1
            return
        self._lsh.insert(doc_id, signature)
        self._refs[doc_id] = signature
        self.stats.references += 1

    def find_near_duplicate(self, text: str) -> int | None:
        """The doc_id of a reference with estimated Jaccard >= threshold, else None."""
        self.stats.checked += 1
        signature = self.minhash(text)
        if signature is None or not self._refs:
            return None
        best_id, best_sim = None, -1.0
        for doc_id in sorted(self._lsh.query(signature)):
            sim = signature.jaccard(self._refs[doc_id])
            if sim >= self.threshold and sim > best_sim:
                best_id, best_sim = doc_id, sim
        if best_id is not None:
            self.stats.flagged += 1
        return best_id

    def is_near_duplicate(self, text: str) -> bool:
        """True if text's 13-gram Jaccard similarity to some reference is >= threshold."""
        return self.find_near_duplicate(text) is not None

    def similarity(self, a: str, b: str) -> float:
        """The MinHash estimate of the word n-gram Jaccard similarity of two texts."""
        ma, mb = self.minhash(a), self.minhash(b)
        if ma is None or mb is None:
            return 0.0
        return float(ma.jaccard(mb))


def exact_jaccard(a: str, b: str, ngram: int = 13) -> float:
    """Exact word n-gram Jaccard similarity (for checks; MinHash estimates this)."""
    sa, sb = set(word_shingles(a, ngram)), set(word_shingles(b, ngram))
    if not sa and not sb:
        return 0.0
    return len(sa & sb) / len(sa | sb)

