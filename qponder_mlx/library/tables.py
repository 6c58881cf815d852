"""CSV and JSONL views of the store: one row per file, sorted by path, written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence

from qponder_mlx.io import atomic_write_text

COLUMNS = ("path", "score", "format_ok", "error", "reasoning", "text", "mode", "model", "adapter",
           "prompt_version", "identity", "sha256", "seconds", "tokens", "scored_at")

# A cell starting with one of these is a formula to Excel/LibreOffice; model text or a file name
# could start that way, so such cells get a leading apostrophe (OWASP's CSV-injection advice).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value):
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return "" if value is None else value


def export_row(row: dict) -> dict:
    """The public fields of a store row, in COLUMNS order."""
    return {c: row.get(c) for c in COLUMNS}


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_cell(v) for v in export_row(r).values()])
    atomic_write_text(path, buf.getvalue())


def write_jsonl(rows: Sequence[dict], path: str | os.PathLike) -> None:
    lines = [json.dumps(export_row(r), ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
