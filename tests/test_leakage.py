"""Leakage: r(C) on hand-made chunks, the DP against brute force, bpb(alpha) by hand, and r(C)
of stored chunks ignoring padding."""

from __future__ import annotations

import numpy as np
import pytest

from retro_jax.eval import leakage

M = 64


def _brute(a: list[int], b: list[int]) -> int:
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            n = 0
            while i + n < len(a) and j + n < len(b) and a[i + n] == b[j + n] and a[i + n] >= 0:
                n += 1
            best = max(best, n)
    return best


def test_identical_disjoint_and_a_run_of_nine():
    rng = np.random.default_rng(0)
    chunk = rng.permutation(1000)[:M]
    continuation = rng.integers(2000, 3000, M)
    assert leakage.longest_common_substring(chunk, np.r_[chunk, continuation]) / M == 1.0
    other = rng.integers(5000, 6000, 2 * M)
    assert leakage.longest_common_substring(chunk, other) / M == 0.0
    shared = other.copy()
    shared[50:59] = chunk[20:29]  # nine contiguous tokens of C
    assert leakage.longest_common_substring(chunk, shared) / M == 9 / 64


def test_missing_tokens_break_runs_and_never_match():
    assert leakage.longest_common_substring([1, 2, 3, 4, 5, 6], [1, 2, 3, -1, 5, 6]) == 3
    assert leakage.longest_common_substring([-1, -1, -1], [-1, -1, 7]) == 0


def test_batched_dp_equals_brute_force():
    rng = np.random.default_rng(1)
    a = rng.integers(-1, 4, (30, 12))
    b = rng.integers(-1, 4, (30, 3, 20))
    got = leakage.longest_common_substring_batch(a, b)
    want = [max(_brute(a[i].tolist(), b[i, j].tolist()) for j in range(3)) for i in range(30)]
    np.testing.assert_array_equal(got, want)


def test_bpb_alpha_by_hand_and_bpb_1_is_plain_bpb():
    bits_C, bytes_C, r_C = np.array([1.0, 2.0, 3.0]), np.array([1, 1, 2]), np.array([0.0, 0.5, 1.0])
    out = leakage.bpb_alpha(bits_C, bytes_C, r_C)
    assert out == {"0": 1.0, "0.125": 1.0, "0.25": 1.0, "0.5": 1.5, "0.75": 1.5, "1": 1.5}
    assert out["1"] == bits_C.sum() / bytes_C.sum()
    assert leakage.bpb_alpha(bits_C, bytes_C, np.array([0.5, 0.5, 1.0]))["0"] is None  # nothing kept


class _Store:
    def __init__(self, tokens, lengths):
        self.tokens, self.lengths = np.asarray(tokens), np.asarray(lengths)
        self.num_chunks, self.chunk_size = len(lengths), self.tokens.shape[1]


class _Db:
    neighbours_stored = 10

    def __init__(self, store, nb):
        self.store, self.nb = store, nb

    def chunks(self, split):
        return self.store

    def neighbour_tokens(self, split, ids, k):
        assert k == 10
        return self.nb[ids]


def test_overlap_ratios_of_stored_chunks_ignore_padding():
    m = 8
    tokens = np.array([[5, 6, 7, 8, 9, 10, 11, 12],  # its first 8 tokens are a neighbour's
                       [20, 21, 22, 0, 0, 0, 0, 0],  # 3 real tokens, then pad id 0
                       [30, 31, 32, 33, 34, 35, 36, 37]])  # shares 2 tokens
    nb = np.full((3, 10, 2 * m), -1)
    nb[0, 3, :m] = tokens[0]
    nb[1, 0, :] = 0  # all pad ids: must not match the chunk's padding
    nb[1, 1, 5:7] = [21, 22]
    nb[2, 9, 10:12] = [33, 34]
    r = leakage.overlap_ratios(_Db(_Store(tokens, [8, 3, 8]), nb), batch_size=2)
    np.testing.assert_allclose(r, [1.0, 2 / 8, 2 / 8])
    h = leakage.histogram(r, bins=4)
    assert sum(h["counts"]) == 3 and h["one"] == 1 and h["zero"] == 0
    assert h["counts"] == [0, 2, 0, 1]  # [0, .25), [.25, .5) holds 0.25, ..., [.75, 1] holds 1


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[B, M\]"):
        leakage.longest_common_substring_batch(np.zeros((2, 3)), np.zeros((3, 1, 4)))
