"""The tokenizer as GGUF metadata: the tokenizer.* keys gguf_export.py writes.

Copied from a GGUF (`copied_tokenizer`, every tokenizer.* key) or converted
(`converted_tokenizer`): a byte-level BPE tokenizer.json (tokenizer.ggml.model "gpt2") or our
ByteTokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Pre-tokenizer regexes llama.cpp knows by name (tokenizer.ggml.pre), as tokenizer.json spells them.
GPT2_PRE = "gpt-2"  # ByteLevel(use_regex=True): GPT-2's own regex
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# llama.cpp refuses a "gpt2" vocabulary without merges and gguf cannot write an empty array: the
# byte tokenizer gets one merge that never fires (GPT-2's regex splits letters from digits).
BYTE_SENTINEL_MERGE = "a 1"


def gguf_field(field: Any) -> tuple[Any, Any, Any]:
    """(value, type, array element type or None) of a GGUFReader field, strings as raw bytes."""
    from gguf import GGUFValueType as V

    main = V(int(field.types[0]))
    if main == V.ARRAY:
        if len(field.types) != 2:
            raise ValueError(f"metadata key {field.name!r} is a nested array, which export_gguf cannot copy")
        sub = V(int(field.types[1]))
        if sub == V.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, sub
        return [v for i in field.data for v in field.parts[i].tolist()], main, sub
    if main == V.STRING:
        return bytes(field.parts[field.data[0]]), main, None
    return field.parts[field.data[0]].tolist()[0], main, None


def copied_tokenizer(path: Path, vocab_size: int) -> list[tuple[str, Any, Any, Any]]:
    """Every tokenizer.* key of the GGUF `path`, for a model with `vocab_size` rows."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # gguf raises ValueError, struct.error, ... for a torn file
        raise ValueError(f"--tokenizer-gguf {str(path)!r} is not a readable GGUF file ({type(err).__name__})") from None
    entries = [(name, *gguf_field(f)) for name, f in reader.fields.items() if name.startswith("tokenizer.")]
    tokens = next((e[1] for e in entries if e[0] == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise ValueError(f"--tokenizer-gguf {str(path)!r} holds no tokenizer (no tokenizer.ggml.tokens)")
    if len(tokens) != vocab_size:
        raise ValueError(f"--tokenizer-gguf {str(path)!r} has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    return [e for e in entries if not (isinstance(e[1], list) and not e[1])]  # gguf cannot write an empty array


@dataclass
class Vocabulary:
    """A converted tokenizer in llama.cpp's terms (tokenizer.ggml.*)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    eos_id: int
    bos_id: int | None

    def entries(self, gguf: Any) -> list[tuple[str, Any, Any, Any]]:
        K, V = gguf.Keys.Tokenizer, gguf.GGUFValueType
        out = [
            (K.MODEL, "gpt2", V.STRING, None),
            (K.PRE, self.pre, V.STRING, None),
            (K.LIST, self.tokens, V.ARRAY, V.STRING),
            (K.TOKEN_TYPE, self.types, V.ARRAY, V.INT32),
            (K.MERGES, self.merges, V.ARRAY, V.STRING),
            (K.EOS_ID, self.eos_id, V.UINT32, None),
            (K.ADD_BOS, self.bos_id is not None, V.BOOL, None),
            (K.ADD_EOS, False, V.BOOL, None),
        ]
        return out + ([(K.BOS_ID, self.bos_id, V.UINT32, None)] if self.bos_id is not None else [])


def _pre_tokenizer(spec: dict | None, where: str) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer (tokenizer.ggml.pre)."""
    parts = [] if spec is None else spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return GPT2_PRE
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX and not parts[1].get("use_regex", True):
        return "llama-bpe"
    raise ValueError(f"{where}: pre-tokenizer {kinds} is not one llama.cpp names (GPT-2's or Llama 3's byte-level regex); pass --tokenizer-gguf with a GGUF of the same tokenizer")


def byte_level_char(b: int) -> str:
    """GPT-2's byte-level spelling of byte b: itself if printable, else chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return chr(b) if b in printable else chr(256 + [c for c in range(256) if c not in printable].index(b))


def _gguf_types(gguf: Any) -> tuple[int, int, int, int]:
    t = gguf.TokenType
    return int(t.NORMAL), int(t.CONTROL), int(t.USER_DEFINED), int(t.UNUSED)


def converted_tokenizer(gguf: Any, tokenizer: Any, vocab_size: int) -> Vocabulary:
    """Our ByteTokenizer, or a byte-level BPE tokenizers JSON file, as a "gpt2" vocabulary."""
    from qat.data.tokenizer import ByteTokenizer, HFTokenizer
    from qat.hf.tokenizer import BYTE_EOS_TOKEN

    normal, control, user, unused = _gguf_types(gguf)
    if isinstance(tokenizer, ByteTokenizer):
        tokens = [byte_level_char(b) for b in range(256)] + [BYTE_EOS_TOKEN]  # id b = byte b
        vocab = Vocabulary(tokens, [normal] * 256 + [control], [BYTE_SENTINEL_MERGE], GPT2_PRE, tokenizer.eos_id, None)
    elif isinstance(tokenizer, HFTokenizer):
        where = f"tokenizer {tokenizer.path!r}"
        spec = json.loads(Path(tokenizer.path).read_text(encoding="utf-8"))
        model = spec.get("model", {})
        if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise ValueError(f"{where} is not a byte-level BPE (model {model.get('type')!r}); pass --tokenizer-gguf with a GGUF of the same tokenizer")
        if spec.get("normalizer") is not None:
            raise ValueError(f"{where} has a normalizer, which llama.cpp's BPE does not apply; pass --tokenizer-gguf")
        from tokenizers import Tokenizer

        ids = {i: t for t, i in Tokenizer.from_file(tokenizer.path).get_vocab(with_added_tokens=True).items()}
        if sorted(ids) != list(range(len(ids))):
            raise ValueError(f"{where}: token ids are not 0..{len(ids) - 1} without gaps")
        added = {a["id"]: control if a.get("special") else user for a in spec.get("added_tokens", [])}
        tokens, types = [ids[i] for i in range(len(ids))], [added.get(i, normal) for i in range(len(ids))]
        # Merges as "a b"; the list-of-pairs form may hold spaces, which gguf spells U+0120 (as llama.cpp reads them).
        merges = [m if isinstance(m, str) else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m) for m in model.get("merges", [])]
        pre = _pre_tokenizer(spec.get("pre_tokenizer"), where) if merges else GPT2_PRE  # no merges: any split gives the bytes
        vocab = Vocabulary(tokens, types, merges or [BYTE_SENTINEL_MERGE], pre, tokenizer.eos_id, tokenizer.bos_id)
    else:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} cannot be converted (ByteTokenizer or a byte-level BPE tokenizer.json can); pass --tokenizer-gguf")
    if len(vocab.tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is {vocab_size}")
    pad = vocab_size - len(vocab.tokens)  # embedding rows past the tokenizer: llama.cpp needs a token each
    vocab.tokens += [f"[PAD{i}]" for i in range(len(vocab.tokens), vocab_size)]
    vocab.types += [unused] * pad
    return vocab
