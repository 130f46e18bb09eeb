"""What a run was trained against, by content: a model's path and a SHA-256 of its weights.

Used for distill=kd's teacher and for a LoRA run's base. A checkpoint records the identity;
resuming, merging or exporting against another model is then refused by name, wherever the
same weights were moved to and whatever a path now holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path


def model_identity(path: Path) -> dict[str, str]:
    """{"path", "sha256"}: `path` as given (train.py gives absolute ones), and the digest of a save_pretrained directory's
    config.json and every weight file, in name order, or of one checkpoint file (which holds
    its weights, e.g. scripts/ptq.py's output)."""
    from qat.hf.load import CONFIG_FILE, weight_files

    path = Path(path)
    files = [path] if path.is_file() else [path / CONFIG_FILE, *sorted(weight_files(path))]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest()}


def check_same_model(saved: Mapping[str, str] | None, now: Mapping[str, str], *, absent: str, recorded: str, remedy: str) -> None:
    """A checkpoint goes on only with the model it was trained against (the same weights,
    wherever they lie now). `absent`: the line when the checkpoint recorded none; `recorded`
    introduces the saved model ("ckpt was distilled from"); `remedy` says what to do instead."""
    if saved is None:
        raise ValueError(absent)
    if saved.get("sha256") != now["sha256"]:
        raise ValueError(
            f"{recorded} {saved.get('path')} (sha256 {str(saved.get('sha256'))[:12]}), "
            f"not {now['path']} (sha256 {now['sha256'][:12]}); {remedy}"
        )
