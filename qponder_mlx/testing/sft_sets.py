"""Small SFT data sets for tests, benches and trying `qponder train` offline."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from qponder_mlx.prompts import chat_messages, format_response

CC0_IMAGES = Path(__file__).resolve().parents[1] / "assets" / "cc0_mini" / "images"


def sft_row(image: str | os.PathLike, answer: str, *, mos: float | None = None,
            row_id: str | None = None) -> dict:
    """One row in the chat format `qponder distill` writes."""
    row = {"images": [str(image)], "messages": chat_messages(answer=answer)}
    if row_id is not None:
        row["id"] = row_id
    if mos is not None:
        row["mos"] = mos
    return row


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict | str]) -> Path:
    """Rows as JSONL (a str row is written verbatim, e.g. a broken line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cc0_sft_rows(n: int, *, start: int = 0, reasoning: str = "The photo looks {q}.") -> list[dict]:
    """n rows over the CC0 mini images (absolute paths) with short canonical answers."""
    images = sorted(CC0_IMAGES.iterdir())
    rows = []
    for i in range(start, start + n):
        img = images[i % len(images)]
        level = int(img.stem.rsplit("_", 1)[-1])  # 1 (mild) .. 5 (strong) distortion
        mos = round(5.0 - 0.8 * level + 0.01 * (i % 7), 2)
        q = {1: "sharp", 3: "soft", 5: "bad"}.get(level, "fair")
        rows.append(sft_row(img, format_response(reasoning.format(q=q), mos), mos=mos,
                            row_id=img.stem + f"-{i}"))
    return rows
