"""Score a photo library: discover files, keep results in a SQLite store, export views of it.

    from qponder_mlx.library import ResultStore, discover, score_library
    found = discover(["~/Pictures"])
    with ResultStore("results.sqlite") as store:
        summary = score_library(scorer, found.files, store)
        rows = store.rows(scorer.identity, map(str, found.files))
"""

from qponder_mlx.library.discover import IMAGE_SUFFIXES, Discovery, discover
from qponder_mlx.library.report import render_report, write_report
from qponder_mlx.library.score_job import RunSummary, StopFlag, score_library, stop_on_sigint
from qponder_mlx.library.store import ResultStore, StoreError
from qponder_mlx.library.tables import write_csv, write_jsonl

__all__ = [
    "IMAGE_SUFFIXES", "Discovery", "ResultStore", "RunSummary", "StopFlag", "StoreError",
    "discover", "render_report", "score_library", "stop_on_sigint", "write_csv", "write_jsonl",
    "write_report",
]
