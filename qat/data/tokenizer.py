"""Tokenizers: raw UTF-8 bytes (default, no files needed) or a local Hugging Face JSON file.

Both expose the same small interface the data pipeline uses:
`vocab_size`, `eos_id` (the separator appended after every document),
`encode(str) -> list[int]`, `encode_batch(list[str])`, `decode(ids) -> str` and
`identity()`, a stable string that goes into token-cache keys.
"""
from __future__ import annotations

import hashlib
import os
from typing import Protocol, Sequence

from qat.data.paths import absolute_path


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def identity(self) -> str: ...


class ByteTokenizer:
    """Ids 0-255 are the UTF-8 bytes; id 256 is the end-of-document separator."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # Special ids have no bytes; invalid byte sequences (e.g. a window cut mid-character)
        # decode to U+FFFD instead of raising.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def identity(self) -> str:
        return "bytes-v1"


class HFTokenizer:
    """A `tokenizers` JSON file (e.g. written by scripts/train_tokenizer.py).

    `eos_token` must be a token of the file's vocabulary; it separates documents.
    Special tokens from the file's post-processor (BOS etc.) are not added, and
    special-token text inside a document is encoded as plain text: only the
    pipeline inserts the separator. `bos_token` (a pretrained model's, see
    qat/hf/tokenizer.py) is put before every encoded text, as the model saw in training.
    """

    def __init__(self, path: str, eos_token: str = "<|endoftext|>", bos_token: str | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        resolved = absolute_path(path)
        if not os.path.isfile(resolved):
            raise ValueError(f"tokenizer.path={path!r} does not exist (expected a tokenizers JSON file)")
        self.path = resolved
        try:
            self._tokenizer = _HFTokenizer.from_file(resolved)
        except Exception as err:  # the tokenizers library raises a bare Exception for bad JSON
            raise ValueError(f"tokenizer.path={path!r} is not a tokenizers JSON file ({str(err).splitlines()[0][:100]})") from None
        # A document that happens to contain the text "<|endoftext|>" must not produce the
        # separator id: special tokens in the text are encoded as ordinary text.
        self._tokenizer.encode_special_tokens = True
        eos_id = self._tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer.eos_token={eos_token!r} is not in the vocabulary of {path}")
        self.eos_token = eos_token
        self.eos_id = int(eos_id)
        # --- begin-of-text token (pretrained Hugging Face checkpoints) ---
        bos_id = None if bos_token is None else self._tokenizer.token_to_id(bos_token)
        if bos_token is not None and bos_id is None:
            raise ValueError(f"tokenizer.bos_token={bos_token!r} is not in the vocabulary of {path}")
        self.bos_token = bos_token
        self.bos_id = None if bos_id is None else int(bos_id)
        self._prefix = [] if bos_id is None else [int(bos_id)]
        # --- end begin-of-text token ---
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        with open(resolved, "rb") as f:
            self._digest = hashlib.sha256(f.read()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._prefix + self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._prefix + e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def identity(self) -> str:
        # The file content, not its path, decides the tokens.
        bos = "" if self.bos_token is None else f":bos={self.bos_token}"  # unchanged key without one
        return f"hf:{self._digest}:eos={self.eos_token}{bos}"
