"""Split plain-text files into documents and write them as JSON lines (`data=local` reads them).

    python scripts/text_to_jsonl.py /usr/share/games/fortunes/{literature,wisdom,people} --separator % --out fortunes.jsonl
    python scripts/text_to_jsonl.py notes/*.txt --out notes.jsonl          # blank lines separate documents

A document is the text between separator lines (a line equal to --separator), or between
blank lines when none is given; surrounding white space is stripped and empty documents are
dropped. Files must be UTF-8. The output is written atomically.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from qat.io import atomic_write_text


def documents(text: str, separator: str | None) -> Iterator[str]:
    pattern = r"^\s*$" if separator is None else rf"^{re.escape(separator)}\s*$"
    for part in re.split(pattern, text, flags=re.MULTILINE):
        if part.strip():
            yield part.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="UTF-8 text files")
    p.add_argument("--separator", default=None, help="a line equal to this ends a document (default: blank lines)")
    p.add_argument("--min-chars", type=int, default=1, help="drop documents shorter than this")
    p.add_argument("--out", required=True, help="JSON lines file to write ({'text': ...} per document)")
    args = p.parse_args(argv)
    docs = []
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            print(f"error: {name!r} is not a file", file=sys.stderr)
            return 2
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            print(f"error: {name!r} is not UTF-8: byte {err.object[err.start]:#04x} at offset {err.start}", file=sys.stderr)
            return 2
        docs.extend(d for d in documents(text, args.separator) if len(d) >= args.min_chars)
    if not docs:
        print(f"error: no documents in {args.files} (separator {args.separator!r})", file=sys.stderr)
        return 2
    atomic_write_text(args.out, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    print(f"{len(docs)} documents, {sum(len(d) for d in docs):,} characters -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
