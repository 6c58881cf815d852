"""Fast first, reasons where they matter: `qponder score --mode fast --explain worst:50,best:20`.

Fast mode scores a whole library at one forward pass a photo; reasoning costs hundreds of decode
steps a photo, so a 20,000-photo library in reason mode takes hours while a photographer mostly
wants the reasons for the worst and the best shots. This module picks those photos from the fast
scores in the store and scores them again in reason mode with the same loaded model. Both results
stay in the store (one row per content and scorer identity), so a rerun skips both passes' done
work and the report shows the fast score and, for the picked photos, the reasoning.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from qponder_mlx.library.score_job import RunSummary, StopFlag, score_library
from qponder_mlx.library.store import ResultStore

if TYPE_CHECKING:
    from qponder_mlx.scoring import Scorer

_PART = re.compile(r"^(worst|best):(\d+)$")


@dataclass(frozen=True)
class ExplainSpec:
    """How many of the lowest (`worst`) and highest (`best`) fast scores to reason about."""

    worst: int = 0
    best: int = 0


def parse_explain(spec: str) -> ExplainSpec:
    """'worst:50,best:20' (either part alone, any order) -> ExplainSpec; ValueError (one line)."""
    counts: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        m = _PART.match(part.lower())
        if m is None or m.group(1) in counts:
            raise ValueError(f"--explain {spec!r}: expected worst:N and/or best:N separated by a "
                             "comma, each once (e.g. worst:50,best:20)")
        counts[m.group(1)] = int(m.group(2))
    if not any(counts.values()):
        raise ValueError(f"--explain {spec!r}: asks for no photo — give worst:N or best:N with "
                         "N >= 1")
    return ExplainSpec(**counts)


def pick_for_explain(rows: Sequence[dict], spec: ExplainSpec) -> list[str]:
    """Paths of the `spec.worst` lowest and `spec.best` highest scored rows, one per content.

    Rows without a score (errors, no valid answer) are never picked; ties break by path, so the
    same store gives the same picks on every run (which is what lets a rerun resume). A photo in
    both ends (a library smaller than worst + best) is picked once; two copies of one photo
    count once, by their first path.
    """
    first: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["path"]):
        if r["score"] is not None and not r["error"]:
            first.setdefault(r["sha256"], r)
    ranked = sorted(first.values(), key=lambda r: (r["score"], r["path"]))
    worst = ranked[:spec.worst]
    best = sorted(ranked, key=lambda r: (-r["score"], r["path"]))[:spec.best]
    picked = {r["path"] for r in worst} | {r["path"] for r in best}
    return sorted(picked)


def reason_scorer(fast: Scorer, **config) -> Scorer:
    """A reason-mode scorer on the fast scorer's loaded model (no second load); `config`
    overrides ScoreConfig fields (e.g. sampling)."""
    from qponder_mlx.scoring import Scorer

    cfg = replace(fast.config, mode="reason", readout="text", **config)
    return Scorer(fast.loaded, cfg)


def explain_library(fast: Scorer, files: Sequence[str | os.PathLike], store: ResultStore,
                    spec: ExplainSpec, *, reason: Scorer | None = None,
                    stop: StopFlag | None = None, progress: bool = True
                    ) -> tuple[Scorer, list[str], RunSummary]:
    """Reason-mode results for the photos `spec` picks from `files`' fast scores in `store`.

    Returns the reason scorer, the picked paths and the reason pass's summary. Run it after
    `score_library(fast, files, store)`; files without a fast score yet are not considered.
    """
    reason = reason or reason_scorer(fast)
    rows = store.rows(fast.identity, [os.path.abspath(f) for f in files])
    picked = pick_for_explain(rows, spec)
    summary = score_library(reason, picked, store, stop=stop, progress=progress)
    return reason, picked, summary


def with_explanations(rows: Sequence[dict], explained: Sequence[dict]) -> list[dict]:
    """`rows` (fast), each with `explained` set to its reason-mode row when there is one."""
    by_sha = {r["sha256"]: r for r in explained}
    return [{**r, "explained": by_sha.get(r["sha256"])} for r in rows]
