"""What a run's scores look like, in a few lines: the end-of-run summary of `qponder score` and
the listings of `qponder top` (both read store rows, see `ResultStore.rows`)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence

from qponder_mlx.safe_paths import shown


def scored(rows: Sequence[dict]) -> list[dict]:
    """Rows with a score, worst first (ties by path, so the order is stable)."""
    return sorted((r for r in rows if r.get("score") is not None and not r.get("error")),
                  key=lambda r: (r["score"], r["path"]))


def stats_line(rows: Sequence[dict]) -> str | None:
    """`scores: mean 3.41, median 3.50, min 1.20, max 4.80 over 120 photos`; None if none."""
    s = [r["score"] for r in scored(rows)]
    if not s:
        return None
    return (f"scores: mean {statistics.fmean(s):.2f}, median {statistics.median(s):.2f}, "
            f"min {min(s):.2f}, max {max(s):.2f} over {len(s)} photos")


def listing(rows: Sequence[dict], *, worst: int = 0, best: int = 0) -> list[str]:
    """`worst N:` / `best N:` headed lines `  1.20  /path/a.jpg`, best list best first."""
    ranked = scored(rows)
    out: list[str] = []
    for label, picked in (("worst", ranked[:worst] if worst else []),
                          ("best", ranked[::-1][:best] if best else [])):
        if picked:
            out.append(f"{label} {len(picked)}:")
            out += [f"  {r['score']:.2f}  {shown(r['path'])}"
                    + ("" if os.path.lexists(r["path"]) else "  (file no longer there)")
                    for r in picked]
    return out


def settings_note(identity: str, before: int, others: Sequence[dict]) -> str | None:
    """When this run's scorer had no result in the store but other settings did: one line
    saying that these are new settings, scored anew, with the earlier results kept (a changed
    --max-tokens or pixel budget is a different store key)."""
    others = [o for o in others if o["identity"] != identity]
    if before or not others:
        return None
    latest = others[0]["identity"]
    mine, theirs = identity.split(":"), latest.split(":")
    changed = [_name(i, a, b) for i, (a, b) in enumerate(zip(mine, theirs)) if a != b] \
        if len(mine) == len(theirs) else []
    what = "; ".join(changed) or "another model, mode or read-out"
    return (f"new scorer settings for this store ({what}): every photo is scored anew under "
            f"its own key; the {sum(o['results'] for o in others)} earlier results are kept — "
            "use the earlier settings to see them again, or --rescore to redo a run")


def _name(i: int, new: str, old: str) -> str:
    """Identity part `i` (weights:mode:prompt:pixels:tokens@temperature, `Scorer.identity`)
    that differs, in flag terms."""
    if i == 0:
        return "another model or adapter"
    if i == 1:
        return f"--mode {old} -> {new}"
    if i == 2:
        return f"prompt {old} -> {new}"
    if new.startswith("px") and old.startswith("px"):
        return f"--min/--max-pixels {old[2:]} -> {new[2:]}"
    if new.startswith("t") and old.startswith("t") and "@" in new and "@" in old:
        (nt, ntemp), (ot, otemp) = new[1:].split("@"), old[1:].split("@")
        parts = [f"--max-tokens {ot} -> {nt}"] if nt != ot else []
        parts += [f"--temperature {otemp} -> {ntemp}"] if ntemp != otemp else []
        return ", ".join(parts)
    return f"{old} -> {new}"
