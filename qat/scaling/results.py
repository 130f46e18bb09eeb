"""Run results as one tidy table, and as `Run`s for the scaling-law fit.

Two sources:
- our trainer's `results.json`, one per run directory (collected recursively, one CSV row
  per run; see RESULT_COLUMNS);
- the QuEST paper's published table of 104 runs (`load_quest_runs`), whose quantizer class
  names are mapped to the same precision keys our runs use.

Precision keys (qat.scaling.precision): "bf16", "w{b}a{c}" (e.g. "w4a4", weight-only "w4a16"), "fp4",
"2:4" (2:4 sparse 4-bit weights), plus method suffixes such as "-nohad" (no Hadamard
rotation); one eff(P) is fitted per key.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from qat.io import atomic_write_text
from qat.scaling.precision import format_bits, storage_bits
from qat.scaling.runs import Run

STATUSES = ("completed", "failed", "running")
RESULT_COLUMNS = (
    "run_dir", "status", "model", "precision", "quant_preset", "w_bits", "a_bits", "memory_bits",
    "non_embedding_params", "total_params", "tokens", "step", "seed", "val_loss", "val_ppl",
    "loss_floor", "unigram_loss", "wall_time_s", "overrides", "mtime",
)  # fmt: skip
# What makes two runs the same experiment (a rerun): newest completed one wins.
CONFIG_IDENTITY = ("precision", "quant_preset", "model", "tokens", "seed")
_NUMERIC = ("w_bits", "a_bits", "memory_bits", "non_embedding_params", "total_params", "tokens", "step", "seed",
            "val_loss", "val_ppl", "loss_floor", "unigram_loss", "wall_time_s")  # fmt: skip
_NEEDED_TO_FIT = ("non_embedding_params", "tokens", "val_loss")
_OPTIONAL_TO_FIT = ("w_bits", "a_bits", "memory_bits")

Warn = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# The published QuEST table.


def quest_precision(w_quant: str, a_quant: str, w_bits: float, a_bits: float) -> str:
    """Precision key of a published run; the first matching rule wins."""
    if w_quant == "NoQuantizer" and a_quant == "NoQuantizer":
        return "bf16"
    if a_quant == "NoQuantizer":
        return f"w{format_bits(w_bits)}a16"
    if "FP4" in w_quant or "FP4" in a_quant:
        return "fp4"
    if "FourEight" in w_quant:
        return "2:4"
    if "Hadamard" in w_quant:
        return f"w{format_bits(w_bits)}a{format_bits(a_bits)}"
    if w_quant in ("TrustQuantizer", "ClipQuantizer"):
        return f"w{format_bits(w_bits)}a{format_bits(a_bits)}-nohad"
    raise ValueError(f"quantizer pair ({w_quant!r}, {a_quant!r}) has no precision rule")


def load_quest_runs(path: str | Path) -> list[Run]:
    """The QuEST runs as `Run`s. FP4 runs carry 16 bits in the table (their quantizer has no
    `bits` kwarg); they are given their true 4/4 bits here."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read QuEST table {path}: {err}") from None
    if not isinstance(table, list):
        raise ValueError(f"QuEST table {path}: expected a JSON list of runs, got {type(table).__name__}")
    runs = []
    for i, row in enumerate(table):
        fields = ("non_embedding_parameters", "tokens", "loss", "w_bits", "a_bits", "w_quant", "a_quant")
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            raise ValueError(f"QuEST table {path}: run {i} is missing field {missing[0]!r}")
        key = quest_precision(row["w_quant"], row["a_quant"], row["w_bits"], row["a_bits"])
        w_bits, a_bits = (4.0, 4.0) if key == "fp4" else (float(row["w_bits"]), float(row["a_bits"]))
        size = row.get("model_size")
        memory = storage_bits(w_bits, "FourEight" in row["w_quant"])
        runs.append(Run(N=row["non_embedding_parameters"], D=row["tokens"], precision=key, loss=row["loss"],
                        w_bits=w_bits, a_bits=a_bits, size_label=f"{size}M" if size is not None else None,
                        memory_bits=memory))  # fmt: skip
    return runs


# ---------------------------------------------------------------------------------------
# Our runs: results.json -> rows -> CSV.


def find_result_files(roots: Iterable[str | Path], warn: Warn = _stderr) -> list[Path]:
    """Every results.json under the roots, each file once (overlapping roots dedupe)."""
    found: dict[Path, None] = {}
    for root in map(Path, roots):
        if not root.exists():
            warn(f"{root} does not exist; skipped")
            continue
        candidates = [root] if root.is_file() else sorted(root.rglob("results.json"))
        for path in candidates:
            found.setdefault(path.resolve(), None)
    return list(found)


def _number(value: Any) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value  # ints stay ints so the CSV reads 1000000, not 1000000.0
    raise ValueError(f"{value!r} is not a number")


def read_result(path: Path) -> dict[str, Any]:
    """One results.json as a row of RESULT_COLUMNS; ValueError if unreadable or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if data.get("status") not in STATUSES:
        raise ValueError(f"{path}: status={data.get('status')!r}; expected one of {', '.join(STATUSES)}")
    for name in ("precision", "model"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise ValueError(f"{path}: {name}={data.get(name)!r} must be a non-empty string")
    # run_dir is where the file is now (the file's own "run_dir" may be stale after a move).
    row: dict[str, Any] = {"run_dir": str(path.parent), "status": data["status"], "model": data["model"],
                           "precision": data["precision"], "quant_preset": data.get("quant_preset") or ""}  # fmt: skip
    for name in _NUMERIC:
        try:
            row[name] = _number(data.get(name))
        except ValueError as err:
            raise ValueError(f"{path}: {name}: {err}") from None
    if data["status"] == "completed":
        for name in _NEEDED_TO_FIT:
            if row[name] is None or not math.isfinite(row[name]) or row[name] <= 0:
                raise ValueError(f"{path}: completed run has {name}={row[name]!r}; need a finite number > 0")
    row["overrides"] = json.dumps(data.get("overrides") or [])
    row["mtime"] = path.stat().st_mtime
    return row


def _dedupe_configs(rows: list[dict[str, Any]], warn: Warn) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in CONFIG_IDENTITY), []).append(row)
    kept = []
    for ident, group in groups.items():
        best = max(group, key=lambda r: (r["status"] == "completed", r["mtime"]))
        if len(group) > 1:
            dropped = ", ".join(r["run_dir"] for r in group if r is not best)
            why = "the newest completed run" if best["status"] == "completed" else "none completed; the newest"
            warn(f"{len(group)} runs of {dict(zip(CONFIG_IDENTITY, ident))}: keeping {best['run_dir']} ({why}), dropping {dropped}")
        kept.append(best)
    return sorted(kept, key=lambda r: r["run_dir"])


def collect_results(roots: Sequence[str | Path], warn: Warn = _stderr) -> list[dict[str, Any]]:
    """Rows for every readable results.json under the roots; bad files are warned and skipped."""
    rows = []
    for path in find_result_files(roots, warn):
        try:
            rows.append(read_result(path))
        except ValueError as err:
            warn(f"{err}; skipped")
    return _dedupe_configs(rows, warn)


def write_results_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in RESULT_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_results_csv(path: str | Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read runs file {path}: {err}") from None
    if not header:
        raise ValueError(f"runs file {path} is empty; expected a CSV with columns {', '.join(RESULT_COLUMNS)}")
    missing = [c for c in ("status", "precision", "model") + _NEEDED_TO_FIT if c not in header]
    if missing:
        raise ValueError(f"runs file {path} has no column {missing[0]!r}")
    return rows


def runs_from_rows(rows: Sequence[dict[str, Any]], include_incomplete: bool = False, source: str = "runs", warn: Warn = _stderr) -> list[Run]:
    """Rows (from CSV or collect_results) -> Runs. Errors name the data row (1-based) and field.

    Only completed runs by default. include_incomplete adds failed/running runs that have a
    loss, size and token count (the others are warned about and skipped)."""
    runs = []
    for i, row in enumerate(rows, start=1):
        if row.get("status") not in STATUSES:
            raise ValueError(f"{source} row {i}: status={row.get('status')!r}; expected one of {', '.join(STATUSES)}")
        if row["status"] != "completed":
            if not include_incomplete:
                continue
            empty = [name for name in _NEEDED_TO_FIT if row.get(name) in (None, "")]
            if empty:
                warn(f"{source} row {i}: {row['status']} run without {empty[0]}; skipped")
                continue
        values = {}
        for name in _NEEDED_TO_FIT + _OPTIONAL_TO_FIT:
            raw = row.get(name)
            if raw in (None, "") and name in _OPTIONAL_TO_FIT:
                values[name] = None
                continue
            try:
                values[name] = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"{source} row {i}: field {name!r}={raw!r} is not a number") from None
            if not (math.isfinite(values[name]) and values[name] > 0):
                raise ValueError(f"{source} row {i}: field {name!r}={raw!r} must be a finite number > 0")
        if not row.get("precision"):
            raise ValueError(f"{source} row {i}: field 'precision' is empty")
        runs.append(Run(N=values["non_embedding_params"], D=values["tokens"], precision=row["precision"], loss=values["val_loss"],
                        w_bits=values["w_bits"], a_bits=values["a_bits"], size_label=row.get("model") or None,
                        # results.json from before memory_bits was recorded: dense weights
                        memory_bits=values["memory_bits"] if values["memory_bits"] is not None else values["w_bits"]))  # fmt: skip
    return runs


FORMATS = ("auto", "quest", "csv", "results")


def load_runs(path: str | Path, fmt: str = "auto", include_incomplete: bool = False, warn: Warn = _stderr) -> list[Run]:
    """Runs from a collect_results CSV, a directory of results.json, or the QuEST JSON table.
    "auto" picks by path: directory -> results, *.csv -> csv, *.json -> quest."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not allowed; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if fmt == "auto":
        fmt = "results" if path.is_dir() else {".csv": "csv", ".json": "quest"}.get(path.suffix, "")
        if not fmt:
            raise ValueError(f"cannot tell the format of {path}; pass --format quest|csv|results")
    if fmt == "quest":
        return load_quest_runs(path)
    if fmt == "csv":
        return runs_from_rows(read_results_csv(path), include_incomplete, source=str(path), warn=warn)
    if not path.is_dir():
        raise ValueError(f"--format results needs a directory of results.json; {path} is not one")
    return runs_from_rows(collect_results([path], warn), include_incomplete, source=str(path), warn=warn)
