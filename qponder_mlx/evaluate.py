"""`qponder eval`: score a labelled set and report SRCC/PLCC, format rate and every answer."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from qponder_mlx import metrics
from qponder_mlx.labels import LabelProblem, Sample
from qponder_mlx.progress import progress_bar
from qponder_mlx.scoring import Scorer


@dataclass
class EvalReport:
    model: str
    adapter: str | None
    mode: str
    prompt_version: str
    n_labels: int  # rows in the label file that loaded
    n_bad_labels: int  # rows skipped by the label reader (problems below)
    n_images_failed: int  # images that could not be scored (unreadable...)
    n_scored: int  # answers with a score in [1, 5]; the metrics use these
    format_rate: float | None  # share of generated answers that follow the format (reason mode)
    metrics: dict[str, float]
    seconds: float
    label_problems: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    readout: str = "text"  # reason mode: how `score` was read (scoring.ScoreConfig.readout)
    # readout "expected": the same metrics on the numbers the model wrote (one decode gives both)
    metrics_written: dict[str, float] | None = None

    def to_dict(self) -> dict:
        """Strict JSON: an undefined metric is null, and `metrics_undefined` says why (NaN and
        Infinity are not JSON; strict parsers reject them)."""
        out = asdict(self)
        why = {}
        for key in ("metrics", "metrics_written"):
            values = out.get(key) or {}
            for name, v in values.items():
                if not _finite(v):
                    values[name] = None
                    why[f"{key}.{name}"] = self.undefined_reason()
        out["metrics_undefined"] = why
        return out

    def undefined_reason(self) -> str:
        if self.n_scored < 2:
            return f"needs at least 2 scored answers, got {self.n_scored}"
        return "the scores or the MOS are all equal (a correlation with a constant is undefined)"

    def headline(self) -> str:
        def corr(m: dict) -> str:
            return "  ".join(f"{k.upper()} {m[k]:.4f}" if _finite(m[k]) else f"{k.upper()} n/a"
                             for k in ("srcc", "plcc"))

        fr = "n/a" if self.format_rate is None else f"{self.format_rate:.3f}"
        line = (f"{corr(self.metrics)}  n {self.n_scored}/{self.n_labels}  "
                f"format-rate {fr}  ({self.n_bad_labels} bad label rows, "
                f"{self.n_images_failed} unreadable images)")
        if not all(_finite(self.metrics[k]) for k in ("srcc", "plcc")):
            line += f"\nSRCC/PLCC undefined: {self.undefined_reason()}"
        if self.metrics_written is not None:
            line += f"\nwritten answers: {corr(self.metrics_written)}"
        return line


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def evaluate(scorer: Scorer, samples: Sequence[Sample],
             problems: Sequence[LabelProblem] = (), *, progress: bool = True) -> EvalReport:
    """Score every sample; bad images are counted, not fatal; metrics over scored samples."""
    t0 = time.perf_counter()
    rows: list[dict] = []
    with progress_bar(len(samples), f"eval ({scorer.config.mode})", enabled=progress) as advance:
        for s, r in zip(samples, scorer.score_iter(s.image for s in samples)):
            rows.append({"id": s.id, "image": str(s.image), "mos": s.mos, "score": r.score,
                         "format_ok": r.format_ok, "reasoning": r.reasoning, "text": r.text,
                         "error": r.error, "seconds": round(r.seconds, 4),
                         "written_score": r.written})
            advance()
    answered = [r for r in rows if r["error"] is None]
    scored = [r for r in answered if r["score"] is not None]
    fmt = None
    if scorer.config.mode == "reason" and answered:
        fmt = sum(r["format_ok"] for r in answered) / len(answered)
    m = metrics.summary([r["score"] for r in scored], [r["mos"] for r in scored])
    written = None
    if scorer.config.readout != "text":
        w = [r for r in answered if r["written_score"] is not None]
        written = metrics.summary([r["written_score"] for r in w], [r["mos"] for r in w])
    loaded = scorer.loaded
    return EvalReport(
        model=loaded.source, adapter=str(loaded.adapter) if loaded.adapter else None,
        mode=scorer.config.mode, prompt_version=scorer.config.prompt_version,
        n_labels=len(samples), n_bad_labels=len(problems),
        n_images_failed=len(rows) - len(answered), n_scored=len(scored), format_rate=fmt,
        metrics=m, seconds=round(time.perf_counter() - t0, 3),
        label_problems=[str(p) for p in problems], samples=rows,
        readout=scorer.config.readout, metrics_written=written)
