"""Tokenizers in Hugging Face directories: read a checkpoint's, write ours for `AutoTokenizer`.

Reading: tokenizer.json (a fast tokenizer; we never download or convert a slow one), with
the special tokens from tokenizer_config.json, else generation_config.json / config.json ids.
Writing: our byte tokenizer as an equivalent byte-level `tokenizers` file (the 256 bytes
are ids 0-255, the separator 256), or a `tokenizers` JSON file copied as it is; with a
tokenizer_config.json naming PreTrainedTokenizerFast and the special tokens.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qat.data.tokenizer import ByteTokenizer, HFTokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
# Files that describe a checkpoint's tokenizer beyond tokenizer.json; copied on export as they are.
TOKENIZER_EXTRAS = (TOKENIZER_CONFIG, "special_tokens_map.json", "chat_template.jinja")
BYTE_EOS_TOKEN = "<|endoftext|>"  # the name the byte tokenizer's separator (id 256) gets


def _json_or_empty(path: Path) -> dict[str, Any]:
    from qat.hf.load import read_json

    return read_json(path, "") if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_token(name: str, directory: Path, tokenizer: Any) -> str | None:
    """`name` ("eos"/"bos") as token text: tokenizer_config.json's, else the id that
    generation_config.json or config.json give (the first of a list), looked up."""
    text = _token_text(_json_or_empty(directory / TOKENIZER_CONFIG).get(f"{name}_token"))
    if text is not None:
        return text
    for source in (GENERATION_CONFIG, "config.json"):
        token_id = _json_or_empty(directory / source).get(f"{name}_token_id")
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
        if isinstance(token_id, int) and not isinstance(token_id, bool):
            return tokenizer.id_to_token(token_id)
    return None


def checkpoint_tokenizer(path: str | None) -> HFTokenizer:
    """The tokenizer saved in a Hugging Face model directory (`tokenizer=hf_model`).

    Documents are separated by its eos token; its bos token starts every document when the
    tokenizer's own post-processor adds one (as Llama's does), as in the model's training.
    """
    from tokenizers import Tokenizer

    from qat.hf.load import checkpoint_dir

    if path is None:
        raise ValueError("tokenizer.path=None: tokenizer=hf_model reads a model=hf directory; set model.path=DIR (or tokenizer.path=DIR)")
    directory = checkpoint_dir(path, key="tokenizer.path")
    file = directory / TOKENIZER_FILE
    if not file.is_file():
        raise ValueError(
            f"tokenizer {str(file)!r} does not exist; save a fast tokenizer into the model directory "
            "(tokenizer.save_pretrained(DIR) writes tokenizer.json)"
        )
    tok = Tokenizer.from_file(str(file))
    eos = _special_token("eos", directory, tok)
    if eos is None:
        raise ValueError(f"{str(directory)!r} names no eos token (tokenizer_config.json eos_token or an eos_token_id); one is needed to separate documents")
    bos = _special_token("bos", directory, tok)
    bos_id = None if bos is None else tok.token_to_id(bos)
    adds_bos = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    return HFTokenizer(str(file), eos_token=eos, bos_token=bos if adds_bos else None)


def byte_level_tokenizer() -> Any:
    """A `tokenizers` Tokenizer that encodes exactly as ByteTokenizer: byte b -> id b, no
    merges, and the separator as special token id 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    # Byte-level BPE spells byte b as a printable character; with the byte order as ids and
    # no merges, every byte is its own token.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    tok = Tokenizer(models.BPE(vocab={char[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOS_TOKEN, special=True)])
    if tok.token_to_id(BYTE_EOS_TOKEN) != ByteTokenizer.eos_id:
        raise AssertionError("byte-level tokenizer: the separator must get id 256")
    return tok


def write_tokenizer(tokenizer: Any, out: Path, model_max_length: int) -> dict[str, int | None]:
    """tokenizer.json + tokenizer_config.json (and the checkpoint's own extras, if it came
    from one) into `out`, for AutoTokenizer; returns the bos/eos ids for config.json."""
    if isinstance(tokenizer, ByteTokenizer):
        byte_level_tokenizer().save(str(out / TOKENIZER_FILE))
        _write_config(out, {"eos_token": BYTE_EOS_TOKEN}, model_max_length)
        return {"bos_token_id": None, "eos_token_id": ByteTokenizer.eos_id}
    if not isinstance(tokenizer, HFTokenizer):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} is not allowed; export supports ByteTokenizer and HFTokenizer")
    source = Path(tokenizer.path)
    shutil.copyfile(source, out / TOKENIZER_FILE)
    if (source.parent / TOKENIZER_CONFIG).is_file():
        # A checkpoint's tokenizer (tokenizer=hf_model): its own settings, chat template included.
        for name in TOKENIZER_EXTRAS:
            if (source.parent / name).is_file():
                shutil.copyfile(source.parent / name, out / name)
    else:
        specials = {"eos_token": tokenizer.eos_token}
        if tokenizer.bos_token is not None:
            specials["bos_token"] = tokenizer.bos_token
        _write_config(out, specials, model_max_length)
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}


def _write_config(out: Path, specials: Mapping[str, str], model_max_length: int) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
