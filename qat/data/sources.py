"""Text sources: where documents come from, split into "train" and "val".

A source has `identity()` (a string that changes whenever its documents
would, used in token-cache keys) and `documents(split)`, a lazy iterator of
strings. Sources do no tokenization. The built-in grammar corpus
(`qat.data.corpus.GrammarCorpus`) is a source too, and also knows
`log_prob(doc)`.

* `LocalSource`: local text / JSON lines / parquet files through the
  `datasets` packaged builders (no network); val is a seeded random subset.
* `HubSource`: a Hugging Face Hub dataset, streamed; val is a seeded hash
  subset of the stream, so neither split needs the other's position.
"""
from __future__ import annotations

import codecs
import hashlib
import os
from typing import Any, Iterator, Protocol, Sequence

from qat.data.paths import absolute_path

SPLITS = ("train", "val")
_BUILDER_BY_EXTENSION = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


class TextSource(Protocol):
    def identity(self) -> str: ...
    def documents(self, split: str) -> Iterator[str]: ...


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")


def _builder_for(file: str) -> str | None:
    name = file.lower()
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    return _BUILDER_BY_EXTENSION.get(os.path.splitext(name)[1])


def _list_files(paths: Sequence[str]) -> list[str]:
    """Absolute files: each path is a file, or a folder whose supported files are all taken (recursively)."""
    files: list[str] = []
    for path in paths:
        resolved = absolute_path(path)
        if not os.path.exists(resolved):
            raise ValueError(f"data.path={path!r} does not exist")
        if os.path.isfile(resolved):
            files.append(resolved)
            continue
        found = sorted(
            os.path.join(root, f) for root, _, names in os.walk(resolved) for f in names if _builder_for(f) is not None
        )
        if not found:
            raise ValueError(f"data.path={path!r} holds no .txt, .jsonl, .json or .parquet files")
        files.extend(found)
    return files


def check_utf8(path: str, chunk_bytes: int = 1 << 20) -> None:
    """A one-line error naming the file and byte offset of the first byte that is not UTF-8
    (text and JSON files; the datasets library would fail deep inside with no file named)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ValueError(f"data file {path!r} is not UTF-8: byte 0x{chunk[err.start]:02x} at offset {offset + err.start}; re-encode it as UTF-8") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"data file {path!r} is not UTF-8: it ends inside a multi-byte character (offset {offset})") from None


class LocalSource:
    """Documents from local files (one per line for text files, one per record for JSON lines / parquet).

    `format` is "text", "json" or "parquet", or None to infer it from the file
    extensions. Empty documents are skipped. A seeded `val_fraction` of the
    documents (at least one) is held out as "val".
    """

    def __init__(
        self,
        path: str | Sequence[str],
        format: str | None = None,
        text_field: str = "text",
        val_fraction: float = 0.01,
        seed: int = 0,
        hf_cache_dir: str | None = None,
    ):
        paths = [path] if isinstance(path, str) else list(path)
        self._path = path if isinstance(path, str) else [str(p) for p in paths]  # as given, for error lines
        if not paths:
            raise ValueError("data.path is empty; give a file or folder")
        self.files = _list_files(paths)
        if all(os.path.getsize(f) == 0 for f in self.files):
            raise ValueError(f"empty corpus: data.path={path!r} has only empty files")
        builders = {_builder_for(f) for f in self.files}
        if format is None:
            if None in builders or len(builders) != 1:
                raise ValueError(f"data.source.format=None but the extensions of {paths} do not name one format; set format to text, json or parquet")
            format = builders.pop()
        if format not in ("text", "json", "parquet"):
            raise ValueError(f"data.source.format={format!r} must be one of text, json, parquet")
        if format != "parquet":
            for file in self.files:
                if _builder_for(file) is not None and not file.endswith(_COMPRESSION):
                    check_utf8(file)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.source.val_fraction={val_fraction} must be in (0, 1)")
        self.format = format
        self.text_field = text_field
        self.val_fraction = val_fraction
        self.seed = seed
        self.hf_cache_dir = absolute_path(hf_cache_dir) if hf_cache_dir else None
        self._splits: dict[str, Any] | None = None

    def identity(self) -> str:
        # Size and modification time stand in for the content: hashing large files on every run is too slow.
        stats = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in self.files]
        digest = hashlib.sha256(repr(stats).encode()).hexdigest()[:16]
        return f"local:{self.format}:{digest}:field={self.text_field}:val={self.val_fraction}:seed={self.seed}"

    def _load(self) -> dict[str, Any]:
        if self._splits is None:
            import datasets

            # No progress bar on stderr: a script's stderr holds its own warnings and, for a
            # corpus refused below, its one `error:` line.
            quiet = datasets.are_progress_bars_disabled()
            datasets.disable_progress_bars()
            try:
                dataset = datasets.load_dataset(self.format, data_files=self.files, split="train", cache_dir=self.hf_cache_dir)
            finally:
                if not quiet:
                    datasets.enable_progress_bars()
            if self.text_field not in dataset.column_names:
                raise ValueError(f"data.source.text_field={self.text_field!r} is not a column of {self.files[0]}: columns are {dataset.column_names}")
            if len(dataset) < 2:
                raise ValueError(f"empty corpus: data.path={self._path!r} has {len(dataset)} documents; need at least 2 (train and val)")
            num_val = max(1, round(self.val_fraction * len(dataset)))
            parts = dataset.train_test_split(test_size=num_val, seed=self.seed, shuffle=True)
            self._splits = {"train": parts["train"], "val": parts["test"]}
        return self._splits

    def documents(self, split: str) -> Iterator[str]:
        _check_split(split)
        for text in self._load()[split][self.text_field]:
            if text:
                yield text


def _offline_variable() -> str | None:
    # Read at call time: `datasets` only reads these variables when it is first imported.
    return next((v for v in _OFFLINE_VARIABLES if os.environ.get(v, "").upper() in _TRUE), None)


def _in_val(text: str, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


class HubSource:
    """A Hugging Face Hub dataset, streamed (nothing is downloaded up front).

    Val is the dataset's own `val_split` (e.g. "validation") when it has one;
    otherwise the documents of `split` whose seeded text hash falls below
    `val_fraction` (stable under any reordering of the stream, and neither
    split needs to know where the other stopped). Exactly one of the two is set.
    Reading stops at the data module's token budget (`max_train_tokens`).
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_fraction: float | None = None,
        text_field: str = "text",
        seed: int = 0,
    ):
        if (val_split is None) == (val_fraction is None):
            raise ValueError(f"data.source: set exactly one of val_split ({val_split!r}) and val_fraction ({val_fraction!r})")
        if val_fraction is not None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.source.val_fraction={val_fraction} must be in (0, 1)")
        self.path = path
        self.name = name
        self.split = split
        self.val_split = val_split
        self.val_fraction = val_fraction
        self.text_field = text_field
        self.seed = seed

    def identity(self) -> str:
        held_out = f"split={self.val_split}" if self.val_split else f"fraction={self.val_fraction}:seed={self.seed}"
        return f"hub:{self.path}:{self.name}:{self.split}:field={self.text_field}:val={held_out}"

    def documents(self, split: str) -> Iterator[str]:
        _check_split(split)
        hint = "use data=local data.path=<.txt/.jsonl/.parquet file or folder>"
        variable = _offline_variable()
        if variable is not None:
            raise ValueError(f"hub dataset {self.path!r} must be streamed from the network but {variable}={os.environ[variable]} is set; {hint}")
        from datasets import load_dataset

        hub_split = self.val_split if (split == "val" and self.val_split) else self.split
        # With a hash split, keep the documents whose membership matches the requested split.
        keep_val = None if self.val_split else split == "val"
        try:
            for example in load_dataset(self.path, self.name, split=hub_split, streaming=True):
                if self.text_field not in example:
                    raise ValueError(f"data.source.text_field={self.text_field!r} is not a field of {self.path!r}: fields are {sorted(example)}")
                text = example[self.text_field]
                if text and (keep_val is None or _in_val(text, self.seed, self.val_fraction) == keep_val):
                    yield text
        except ValueError:
            raise
        except Exception as error:  # connection refused, DNS, HTTP errors: all surface differently
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RuntimeError(f"could not stream hub dataset {self.path!r} ({type(error).__name__}: {reason}); without network {hint}") from error
