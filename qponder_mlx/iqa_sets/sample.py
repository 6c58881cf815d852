"""`qponder data sample DIR`: the packaged 36-image CC0 set, ready to try every command offline.

Writes DIR/images/ (4 CC0 photos × blur / noise / JPEG × KADID levels 1, 3, 5), DIR/labels.jsonl
(KADID-10k's mean MOS per type and level: qponder_mlx/assets/cc0_mini/LICENSE.md) and
DIR/sft.jsonl: cold-start rows in `qponder distill`'s format whose reasoning is a canned
description of each image's known distortion — for trying `qponder train` on the tiny model, not
a teacher's reasoning (that is `qponder distill`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qponder_mlx.io import atomic_write_jsonl
from qponder_mlx.prompts import chat_messages, format_response

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "cc0_mini"

# What each distortion looks like at KADID levels 1 (mild), 3 and 5 (strong).
_LOOKS = {
    "blur": {1: "Edges are slightly soft", 3: "Blur softens edges and fine texture",
             5: "Heavy blur smears every edge"},
    "noise": {1: "Fine grain is visible in flat areas", 3: "Noise covers flat areas",
              5: "Strong noise hides fine detail"},
    "jpeg": {1: "Mild compression, barely visible", 3: "JPEG blocking shows around edges",
             5: "Severe JPEG blocking and ringing"},
}


def write_sample(out: str | Path) -> dict[str, Path]:
    """Copy the set into `out`; returns the paths of labels.jsonl, sft.jsonl and images/."""
    out = Path(out)
    images = out / "images"
    shutil.copytree(ASSETS / "images", images, dirs_exist_ok=True)
    rows = [json.loads(line) for line in (ASSETS / "labels.jsonl").read_text().splitlines()]
    atomic_write_jsonl(out / "labels.jsonl", rows)
    sft = []
    for r in rows:
        looks = _LOOKS[r["distortion"]][r["level"]]
        reasoning = f"{looks}. Exposure and colour look natural."
        sft.append({"id": r["id"], "mos": r["mos"], "images": [r["image"]],
                    "messages": chat_messages(answer=format_response(reasoning, r["mos"]))})
    atomic_write_jsonl(out / "sft.jsonl", sft)
    shutil.copy(ASSETS / "LICENSE.md", out / "LICENSE.md")
    return {"labels": out / "labels.jsonl", "sft": out / "sft.jsonl", "images": images}
