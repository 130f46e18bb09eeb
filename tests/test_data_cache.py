"""Token cache: content, reuse, atomic writes, dtype choice, budget, empty input."""
import os

import numpy as np
import pytest

from qat.data.token_cache import load_or_build, token_dtype
from qat.data.tokenizer import ByteTokenizer

DOCS = ["farm: the cow runs.", "sea: two crabs wait.", "héllo", "city: a bus sleeps."]
KEY = {"source": "test-docs", "split": "train"}


class Counting:
    """An iterable of documents that counts how often it is read."""

    def __init__(self, docs):
        self.docs, self.reads = docs, 0

    def __iter__(self):
        self.reads += 1
        yield from self.docs


class WideTokenizer:
    """Fake tokenizer with a vocabulary too large for uint16."""

    vocab_size, eos_id = 70_000, 69_999

    def encode_batch(self, texts):
        return [[65_536 + len(t), 7] for t in texts]

    def identity(self):
        return "wide"


def _expected(docs, tok):
    return np.array([i for d in docs for i in (*tok.encode(d), tok.eos_id)])


def test_cache_content_and_reuse_without_retokenizing(tmp_path):
    tok, docs = ByteTokenizer(), Counting(DOCS)
    first = load_or_build(str(tmp_path), "train", KEY, docs, tok)
    assert first.created and docs.reads == 1
    np.testing.assert_array_equal(first.tokens(), _expected(DOCS, tok))
    assert (first.num_documents, first.num_tokens, first.dtype) == (4, len(_expected(DOCS, tok)), "uint16")
    mtime = os.stat(first.path).st_mtime_ns
    second = load_or_build(str(tmp_path), "train", KEY, docs, tok)
    assert not second.created and docs.reads == 1  # documents not even opened
    assert second.path == first.path and os.stat(second.path).st_mtime_ns == mtime
    np.testing.assert_array_equal(second.tokens(), first.tokens())
    # Any change of the key gives a separate cache.
    other = load_or_build(str(tmp_path), "train", {**KEY, "split": "val"}, Counting(DOCS), tok)
    assert other.created and other.path != first.path


def test_unigram_entropy_is_the_token_frequency_entropy(tmp_path):
    cache = load_or_build(str(tmp_path), "train", KEY, DOCS, ByteTokenizer())
    counts = np.bincount(_expected(DOCS, ByteTokenizer()))
    p = counts[counts > 0] / counts.sum()
    assert cache.unigram_entropy == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)


def test_failure_mid_write_leaves_no_file(tmp_path):
    def broken():
        yield from DOCS * 600  # more than one chunk is written before the failure
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        load_or_build(str(tmp_path), "train", KEY, broken(), ByteTokenizer())
    assert os.listdir(tmp_path) == []


def test_binary_without_sidecar_is_rebuilt(tmp_path):
    # A run killed between the two renames leaves the binary but no sidecar: not trusted.
    cache = load_or_build(str(tmp_path), "train", KEY, DOCS, ByteTokenizer())
    os.remove(cache.path.removesuffix(".bin") + ".json")
    with open(cache.path, "wb") as f:
        f.write(b"\0\0")
    again = load_or_build(str(tmp_path), "train", KEY, Counting(DOCS), ByteTokenizer())
    assert again.created
    np.testing.assert_array_equal(again.tokens(), _expected(DOCS, ByteTokenizer()))


def test_dtype_is_uint16_exactly_while_ids_fit(tmp_path):
    assert token_dtype(257) == np.uint16
    assert token_dtype(65_536) == np.uint16  # largest id 65535
    assert token_dtype(65_537) == np.uint32
    cache = load_or_build(str(tmp_path), "train", KEY, DOCS, WideTokenizer())
    assert cache.dtype == "uint32"
    assert cache.tokens()[:3].tolist() == [65_536 + len(DOCS[0]), 7, 69_999]


def test_token_budget_keeps_whole_documents(tmp_path):
    docs = [f"doc {i:04d}" for i in range(5000)]  # 8 bytes + separator = 9 tokens each
    cache = load_or_build(str(tmp_path), "train", KEY, docs, ByteTokenizer(), max_tokens=9 * 1500 + 1)
    assert (cache.num_documents, cache.num_tokens) == (1501, 9 * 1501)
    exact = load_or_build(str(tmp_path), "train", KEY, docs, ByteTokenizer(), max_tokens=9 * 1500)
    assert exact.num_documents == 1500 and exact.path != cache.path


@pytest.mark.parametrize("docs", [[], ["", ""]])
def test_empty_corpus_is_a_one_line_error(tmp_path, docs):
    with pytest.raises(ValueError, match="empty corpus") as error:
        load_or_build(str(tmp_path), "train", KEY, docs, ByteTokenizer())
    assert "\n" not in str(error.value)
    assert os.listdir(tmp_path) == []
