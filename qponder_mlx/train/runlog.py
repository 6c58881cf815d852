"""A run's metrics: `metrics.jsonl` (append-only, flushed per row) and `curves.html`.

Every row has `step` and `kind` ("train", "val", "skip", ...). The picture is a self-contained
HTML page with inline SVG charts (no plotting library, opens in any browser), rewritten
atomically after each validation and at the end of the run.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from pathlib import Path

from qponder_mlx.io import (
    append_jsonl,
    atomic_write_jsonl,
    atomic_write_text,
    read_jsonl,
    truncate_torn_tail,
)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.html"


class MetricsLog:
    """Append rows to run_dir/metrics.jsonl; on resume, drop rows the checkpoint doesn't cover."""

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None,
                 enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled  # False on distributed ranks other than 0: they write nothing
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_torn_tail(self.path)
        if resume_step is not None and self.path.exists():
            # Steps after the checkpoint will be trained again; their old rows would repeat.
            keep = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= resume_step]
            atomic_write_jsonl(self.path, keep)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run in an old folder starts a fresh log

    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        # NaN/inf become null: the file stays strict JSON for any reader.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in row.items()}
        append_jsonl(self.path, {"time": round(time.time(), 3), **clean})

    def rows(self) -> list[dict]:
        return list(read_jsonl(self.path))


# ---------------------------------------------------------------- the picture

_W, _H, _PAD_L, _PAD_R, _PAD_T, _PAD_B = 560, 260, 58, 16, 28, 36
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2g}"
    return f"{v:.3g}"


def svg_chart(title: str, series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
              *, log_y: bool = False) -> str:
    """One line chart as an <svg> string: series = [(label, [(x, y), ...]), ...]."""
    pts = [(x, y) for _, s in series for x, y in s if _finite(x) and _finite(y)
           and (not log_y or y > 0)]
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
            f'viewBox="0 0 {_W} {_H}" font-family="sans-serif" font-size="11">'
            f'<text x="{_W / 2}" y="16" text-anchor="middle" font-size="13" '
            f'font-weight="bold">{html.escape(title)}</text>')
    if not pts:
        return head + (f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" fill="#888">'
                       'no data yet</text></svg>')
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    xs = [x for x, _ in pts]
    ys = [ty(y) for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B

    def sx(x: float) -> float:
        return _PAD_L + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return _PAD_T + (1 - (y - y0) / (y1 - y0)) * ph

    out = [head, f'<rect x="{_PAD_L}" y="{_PAD_T}" width="{pw}" height="{ph}" fill="none" '
                 'stroke="#ccc"/>']
    for t in _ticks(y0, y1):
        label = _fmt(10 ** t if log_y else t)
        out.append(f'<line x1="{_PAD_L}" x2="{_PAD_L + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" '
                   f'stroke="#eee"/><text x="{_PAD_L - 4}" y="{sy(t) + 4:.1f}" '
                   f'text-anchor="end">{label}</text>')
    for t in _ticks(x0, x1):
        out.append(f'<text x="{sx(t):.1f}" y="{_PAD_T + ph + 14}" text-anchor="middle">'
                   f'{_fmt(t)}</text>')
    out.append(f'<text x="{_PAD_L + pw / 2}" y="{_H - 4}" text-anchor="middle" '
               'fill="#555">step</text>')
    for i, (label, s) in enumerate(series):
        colour = _COLOURS[i % len(_COLOURS)]
        good = [(sx(x), sy(ty(y))) for x, y in s if _finite(x) and _finite(y)
                and (not log_y or y > 0)]
        if not good:
            continue
        if len(good) > 1:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in good)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
                       f'points="{path}"/>')
        if len(good) <= 40:
            out.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.2" fill="{colour}"/>'
                       for a, b in good)
        out.append(f'<text x="{_PAD_L + 8}" y="{_PAD_T + 14 + 13 * i}" fill="{colour}">'
                   f'{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


Chart = tuple[str, Sequence[str], bool]  # (title, metric keys, log scale)

SFT_CHARTS: list[Chart] = [
    ("loss (assistant tokens)", ["loss", "val_loss"], True),
    ("validation: SRCC / PLCC / format rate", ["srcc", "plcc", "format_rate"], False),
    ("learning rate", ["learning_rate"], False),
    ("throughput (tokens/s)", ["tokens_per_s"], False),
    ("peak memory (GB)", ["peak_memory_gb"], False),
]


def _points(rows: list[dict], key: str) -> list[tuple[float, float]]:
    # Skipped steps carry the NaN loss that got them skipped: not a point on the curve.
    return [(r["step"], r[key]) for r in rows if r.get("kind") != "skip" and _finite(r.get(key))]


def write_curves(run_dir: str | Path, title: str = "training run",
                 charts: Sequence[Chart] | None = None) -> Path:
    """Render metrics.jsonl as run_dir/curves.html: one chart per (title, keys, log_y), each key
    a line over the rows that have it (default: SFT's loss, validation, LR, speed, memory)."""
    run_dir = Path(run_dir)
    rows = list(read_jsonl(run_dir / METRICS_FILE))
    rendered = [svg_chart(t, [(k, _points(rows, k)) for k in keys], log_y=log_y)
                for t, keys, log_y in (charts or SFT_CHARTS)]
    skipped = sum(1 for r in rows if r.get("kind") == "skip")
    last = next((r for r in reversed(rows) if r.get("kind") == "train"), None)
    summary = "no steps yet"
    if last:
        summary = f"last step {last['step']}" + (
            f", loss {last['loss']:.4f}" if _finite(last.get("loss")) else "")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:20px}}"
        "svg{margin:6px;border:1px solid #ddd;background:#fff}</style></head><body>"
        f"<h2>{html.escape(title)}</h2><p>{html.escape(summary)}; {skipped} skipped steps "
        f"(NaN/inf); data: {METRICS_FILE}</p>" + "".join(rendered) + "</body></html>\n")
    path = run_dir / CURVES_FILE
    atomic_write_text(path, page)
    return path
