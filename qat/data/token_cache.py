"""Tokenize a split once into a flat memmap of token ids, reused by every later run.

Layout: `<cache_dir>/<name>-<key>.bin` holds the ids of all documents, each
followed by the separator `eos_id`; `<name>-<key>.json` (the sidecar) holds the
token count, dtype and statistics. `key` hashes everything that decides the
tokens (source identity, tokenizer identity, split, token budget), so a
changed input gets a new file instead of a stale one.

Both files are written to a temporary name and renamed into place, the binary
first, the sidecar last: a complete sidecar is the "done" mark, so a killed
tokenization leaves no file that a later run would trust. Two processes that
build the same cache at once each write their own temporary file; the last
rename wins with identical content.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable, Iterator

import numpy as np

from qat.data.tokenizer import Tokenizer
from qat.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_CHUNK_DOCUMENTS = 1024  # documents per encode_batch call


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id (< vocab_size) fits in 16 bits, else uint32: half the disk and page cache."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be >= 1")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def cache_key(parts: dict[str, Any]) -> str:
    """Short stable hash of the JSON-serialised key parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TokenCache:
    """A finished cache: where it is and what it holds."""

    path: str
    num_tokens: int
    num_documents: int
    dtype: str
    unigram_entropy: float  # nats per token of the empirical token distribution (separators included)
    created: bool  # True when this call did the tokenization

    def tokens(self) -> np.memmap:
        """Read-only view of all ids; pages load on demand."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))


def load_or_build(
    cache_dir: str,
    name: str,
    key_parts: dict[str, Any],
    documents: Iterable[str],
    tokenizer: Tokenizer,
    max_tokens: int | None = None,
) -> TokenCache:
    """Return the cache for `key_parts`, tokenizing `documents` only if it is missing.

    `documents` is only iterated when building, so a lazy stream (e.g. a hub
    dataset) is never opened when the cache exists. With `max_tokens`, reading
    stops after the document that reaches the budget (whole documents only).
    """
    parts = {**key_parts, "tokenizer": tokenizer.identity(), "max_tokens": max_tokens, "format": FORMAT_VERSION}
    stem = os.path.join(cache_dir, f"{name}-{cache_key(parts)}")
    cached = _load(stem)
    if cached is not None:
        return cached
    os.makedirs(cache_dir, exist_ok=True)
    return _build(stem, parts, documents, tokenizer, max_tokens)


def _load(stem: str) -> TokenCache | None:
    try:
        with open(stem + ".json") as f:
            meta = json.load(f)
        size = os.path.getsize(stem + ".bin")
    except (OSError, ValueError):
        return None
    if size != meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
        return None  # sidecar from another build; rebuild rather than trust it
    return TokenCache(stem + ".bin", meta["num_tokens"], meta["num_documents"], meta["dtype"], meta["unigram_entropy"], False)


def _encoded_chunks(documents: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype, max_tokens: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (ids with a separator after each document, number of documents) per chunk, honouring the budget."""
    iterator = iter(documents)
    total = 0
    while chunk := list(islice(iterator, _CHUNK_DOCUMENTS)):
        encoded = tokenizer.encode_batch(chunk)
        lengths = np.array([len(ids) + 1 for ids in encoded])
        keep = len(encoded)
        if max_tokens is not None:
            # First document whose end reaches the budget is the last one kept.
            ends = total + np.cumsum(lengths)
            keep = min(keep, int(np.searchsorted(ends, max_tokens)) + 1)
        flat = np.fromiter(
            (i for ids in encoded[:keep] for i in (*ids, tokenizer.eos_id)), dtype=np.int64, count=int(lengths[:keep].sum())
        )
        if flat.size and (flat.min() < 0 or flat.max() >= tokenizer.vocab_size):
            raise ValueError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size})")
        total += flat.size
        yield flat.astype(dtype), keep
        if max_tokens is not None and total >= max_tokens:
            return


def _build(stem: str, parts: dict[str, Any], documents: Iterable[str], tokenizer: Tokenizer, max_tokens: int | None) -> TokenCache:
    dtype = token_dtype(tokenizer.vocab_size)
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    start = time.perf_counter()
    num_documents = 0

    def write(f) -> None:  # noqa: ANN001
        nonlocal num_documents
        for ids, docs in _encoded_chunks(documents, tokenizer, dtype, max_tokens):
            f.write(ids.tobytes())
            counts[:] += np.bincount(ids, minlength=tokenizer.vocab_size)
            num_documents += docs
        if int(counts.sum()) - num_documents == 0:
            raise ValueError(f"empty corpus: {parts.get('source', stem)!r} split {parts.get('split')!r} has no text (documents: {num_documents})")

    atomic_write(stem + ".bin", write)  # a failure (or an empty corpus) leaves no file
    num_tokens = int(counts.sum())
    probs = counts[counts > 0] / num_tokens
    entropy = float(-(probs * np.log(probs)).sum())
    meta = {
        "num_tokens": num_tokens,
        "num_documents": num_documents,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "unigram_entropy": entropy,
        "seconds": round(time.perf_counter() - start, 3),
        "key": parts,
    }
    atomic_write_json(stem + ".json", meta)
    log.info("tokenized %s: %d documents, %d tokens in %.1fs", os.path.basename(stem), num_documents, num_tokens, meta["seconds"])
    return TokenCache(stem + ".bin", num_tokens, num_documents, dtype.name, entropy, True)
