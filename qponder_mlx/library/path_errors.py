"""Error rows for the entries discovery found but could not hand to the scorer.

A broken link or a file name that is not UTF-8 (`Discovery.errors`) is still a photo the user
meant to score; dropping it would make it vanish from the exports and the report without a
trace. Each becomes a read error of its name, stored like any unreadable file: keyed
`unreadable:<name>` (never a content hash), and retried on every run, so a link that is fixed
is scored normally next time and its old error row is dropped.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qponder_mlx.library.score_job import error_reason
from qponder_mlx.library.store import UNREADABLE_PREFIX, FileState, ResultStore

if TYPE_CHECKING:
    from qponder_mlx.scoring import Scorer


def record_path_errors(scorer: Scorer, errors: Sequence[tuple[str, str]],
                       store: ResultStore) -> Counter:
    """Store one error row per (name, reason) for `scorer`; returns reason -> count, in the
    summary's short form ("broken link", ...). Names must be valid UTF-8 (discover's are)."""
    if not errors:
        return Counter()
    loaded, cfg = scorer.loaded, scorer.config
    now = time.time()
    rows = [{
        "sha256": UNREADABLE_PREFIX + name, "identity": scorer.identity, "path": name,
        "score": None, "reasoning": None, "text": None, "format_ok": 0, "error": reason,
        "error_kind": "read", "mode": cfg.mode, "model": loaded.source,
        "adapter": str(loaded.adapter) if loaded.adapter else None, "weights": loaded.identity,
        "prompt_version": cfg.prompt_version, "seconds": 0.0, "tokens": None, "scored_at": now,
    } for name, reason in errors]
    with store.transaction():
        store.put_results(rows)
        # The files table maps a name to its content key; the exports join through it.
        store.put_files([(name, FileState(UNREADABLE_PREFIX + name, -1, -1))
                         for name, _ in errors])
    return Counter(error_reason(reason) for _, reason in errors)
