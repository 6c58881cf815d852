"""How closely the bundle follows the model it was made from, measured on a calibration set.

Both models score the same images with the same prompt and pixel policy:

* `fast` mode (no reasoning: the answer's expected value read after `<think></think><answer>`,
  scoring.py) on every image: SRCC between the two models' scores, mean and max |Δscore|, and
  each model's SRCC and MAE against the set's MOS. Fast scores are continuous, so they show a
  quantization drift that greedy text would hide until it flips a token.
* `reason` mode (greedy, `reason_max_tokens`) on the first `reason_images` images: each model's
  format rate under the one parse rule, and how often the two texts are identical.
* `fast_vs_reason`: on those images, how the bundle's fast scores follow its own reasoned
  scores (SRCC, mean |Δ|) — what an app gives up by scoring without reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import qponder_mlx
from qponder_mlx import metrics
from qponder_mlx.generate import SamplingConfig
from qponder_mlx.labels import LabelError, read_labels
from qponder_mlx.model import LoadedModel
from qponder_mlx.progress import progress_bar
from qponder_mlx.scoring import ScoreConfig, Scorer, ScoreResult

from .config import ExportConfig, ExportConfigError
from .manifest import sha256_file

DEFAULT_CALIBRATION = Path(qponder_mlx.__file__).parent / "assets" / "cc0_mini" / "labels.jsonl"


@dataclass
class Calibration:
    file: Path
    sha256: str
    images: list[Path]
    mos: list[float]
    rows_skipped: int = 0  # label rows the reader refused (bad path, bad MOS...)


@dataclass
class ModelRun:
    fast: list[ScoreResult]
    reason: list[ScoreResult]


def load_calibration(path: str | Path | None, limit: int | None = None) -> Calibration:
    """The labelled images to compare on (default: the CC0 set shipped with qponder)."""
    file = Path(path).expanduser() if path else DEFAULT_CALIBRATION
    try:
        samples, problems = read_labels(file)
    except LabelError as e:
        raise ExportConfigError(f"--calibration: {e}") from None
    samples = samples[:limit] if limit else samples
    if len(samples) < 2:
        raise ExportConfigError(f"{file}: {len(samples)} usable calibration images — SRCC needs "
                                "at least 2")
    return Calibration(file, sha256_file(file), [s.image for s in samples],
                       [s.mos for s in samples], rows_skipped=len(problems))


def run_model(loaded: LoadedModel, calib: Calibration, cfg: ExportConfig, label: str, *,
              progress: bool = True) -> ModelRun:
    """Fast scores on every calibration image, greedy reasoning on the first few."""
    pixels = cfg.pixels()
    fast = Scorer(loaded, ScoreConfig(mode="fast", batch_size=cfg.batch_size, pixels=pixels))
    reason = Scorer(loaded, ScoreConfig(
        mode="reason", batch_size=cfg.batch_size, pixels=pixels,
        sampling=SamplingConfig(max_tokens=cfg.reason_max_tokens, temperature=0.0)))
    n_reason = min(cfg.reason_images, len(calib.images))
    fast_out: list[ScoreResult] = []
    reason_out: list[ScoreResult] = []
    with progress_bar(len(calib.images) + n_reason, f"agreement: {label}",
                      enabled=progress) as advance:
        for r in fast.score_iter(calib.images):
            fast_out.append(r)
            advance()
        for r in reason.score_iter(calib.images[:n_reason]):
            reason_out.append(r)
            advance()
    return ModelRun(fast_out, reason_out)


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def _srcc(a: list[float], b: list[float]) -> float | None:
    try:
        return _r(metrics.srcc(a, b))
    except ValueError:  # fewer than two pairs
        return None


def _mae(a, b) -> float | None:
    return _r(metrics.mae(a, b)) if len(a) else None


def _format_rate(results: list[ScoreResult]) -> float | None:
    answered = [r for r in results if r.error is None]
    return _r(sum(r.format_ok for r in answered) / len(answered)) if answered else None


def compare(ref: ModelRun, bundle: ModelRun, calib: Calibration, cfg: ExportConfig) -> dict:
    """The manifest's `agreement` section."""
    pairs = [(a.score, b.score, m) for a, b, m in zip(ref.fast, bundle.fast, calib.mos)
             if a.score is not None and b.score is not None]
    rs = [p[0] for p in pairs]
    bs = [p[1] for p in pairs]
    mos = [p[2] for p in pairs]
    delta = np.abs(np.subtract(rs, bs)) if pairs else np.zeros(0)
    answered = [(a, b) for a, b in zip(ref.reason, bundle.reason)
                if a.error is None and b.error is None]
    both = [(f.score, r.score) for f, r in zip(bundle.fast, bundle.reason)
            if f.score is not None and r.score is not None]
    return {
        "calibration": {"file": calib.file.name, "sha256": calib.sha256,
                        "images": len(calib.images), "rows_skipped": calib.rows_skipped},
        "reference": "the unfused model the bundle was made from (base + adapter as loaded)",
        "fast": {
            "n": len(pairs),
            "srcc_bundle_vs_reference": _srcc(rs, bs),
            "mean_abs_delta": _r(delta.mean()) if pairs else None,
            "max_abs_delta": _r(delta.max()) if pairs else None,
            "srcc_vs_mos": {"reference": _srcc(rs, mos), "bundle": _srcc(bs, mos)},
            "mae_vs_mos": {"reference": _mae(rs, mos), "bundle": _mae(bs, mos)},
            "errors": {"reference": sum(r.error is not None for r in ref.fast),
                       "bundle": sum(r.error is not None for r in bundle.fast)},
        },
        "reason": {
            "n": len(answered),
            "max_tokens": cfg.reason_max_tokens,
            "format_rate": {"reference": _format_rate(ref.reason),
                            "bundle": _format_rate(bundle.reason)},
            "same_text_rate": _r(sum(a.text == b.text for a, b in answered) / len(answered))
            if answered else None,
        },
        "fast_vs_reason": {
            "n": len(both),
            "about": "the bundle's fast scores against its own reasoned scores (answers that "
                     "parsed) on the reason images",
            "srcc": _srcc(*zip(*both)) if both else None,
            "mean_abs_delta": _mae(*zip(*both)) if both else None,
        },
    }
