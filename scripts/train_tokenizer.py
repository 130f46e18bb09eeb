"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`, offline) and save it as one JSON file.

    python scripts/train_tokenizer.py --builtin --vocab-size 512 --out tokenizer.json
    python scripts/train_tokenizer.py --input corpus.jsonl more/ --vocab-size 32000 --out tok.json

Use the result with `tokenizer=hf tokenizer.path=tok.json`. Byte-level means
every string is encodable (the 256 byte symbols are always in the vocabulary)
and decode(encode(text)) == text. The end-of-document token is added as a
special token; the data pipeline puts it between documents.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

NUM_BYTE_SYMBOLS = 256


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, eos_token: str, min_frequency: int = 2) -> Tokenizer:
    """BPE over GPT-2 style byte symbols; vocab = 256 bytes + eos_token + merges."""
    if vocab_size < NUM_BYTE_SYMBOLS + 1:
        raise ValueError(f"--vocab-size={vocab_size} must be >= {NUM_BYTE_SYMBOLS + 1} (256 bytes + the separator)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_atomic(tokenizer: Tokenizer, out: str) -> None:
    from qat.io import atomic_write

    atomic_write(out, lambda f: f.write(tokenizer.to_str().encode()))


def training_texts(args: argparse.Namespace) -> Iterable[str]:
    if args.builtin:
        from qat.data.corpus import GrammarCorpus

        return GrammarCorpus(args.num_documents, seed=args.seed).documents("train")
    from qat.data.sources import LocalSource

    return LocalSource(args.input, format=args.format, text_field=args.text_field, seed=args.seed).documents("train")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH", help="text / JSON lines / parquet files or folders (train split is used)")
    source.add_argument("--builtin", action="store_true", help="train on the built-in grammar corpus")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="output tokenizer JSON file")
    parser.add_argument("--eos-token", default="<|endoftext|>")
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--format", default=None, help="text, json or parquet (default: from the extension)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--num-documents", type=int, default=4000, help="with --builtin")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if os.path.isdir(args.out):
            raise ValueError(f"--out={args.out!r} is a directory; give the tokenizer JSON file to write")
        tokenizer = train_byte_level_bpe(training_texts(args), args.vocab_size, args.eos_token, args.min_frequency)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_atomic(tokenizer, args.out)
    print(f"wrote {args.out}: vocab {tokenizer.get_vocab_size(with_added_tokens=True)}, separator {args.eos_token!r}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
    sys.exit(main())
