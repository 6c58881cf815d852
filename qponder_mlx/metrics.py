"""IQA agreement metrics: SRCC, KRCC, PLCC (optionally after the VQEG logistic), RMSE, MAE.

scipy does the statistics; this module only fixes the conventions the IQA literature uses.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats


def _pair(pred: Sequence[float], mos: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).ravel()
    m = np.asarray(mos, dtype=np.float64).ravel()
    if p.shape != m.shape:
        raise ValueError(f"pred has {p.size} values but mos has {m.size}")
    if p.size < 2:
        raise ValueError(f"need at least 2 pairs, got {p.size}")
    if not (np.isfinite(p).all() and np.isfinite(m).all()):
        raise ValueError("pred and mos must be finite (drop samples without a score first)")
    return p, m


def _corr(fn, pred, mos) -> float:
    p, m = _pair(pred, mos)
    if np.ptp(p) == 0 or np.ptp(m) == 0:
        return float("nan")  # correlation with a constant is undefined, say so rather than 0
    return float(fn(p, m)[0])


def srcc(pred: Sequence[float], mos: Sequence[float]) -> float:
    """Spearman rank-order correlation (ties get average ranks)."""
    return _corr(stats.spearmanr, pred, mos)


def krcc(pred: Sequence[float], mos: Sequence[float]) -> float:
    """Kendall rank-order correlation (tau-b)."""
    return _corr(stats.kendalltau, pred, mos)


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """VQEG's monotonic 4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3)/|b4|)) + b2."""
    with np.errstate(over="ignore"):  # exp overflow -> inf -> the curve's asymptote, as intended
        return (b1 - b2) / (1.0 + np.exp(-(x - b3) / (np.abs(b4) + 1e-12))) + b2


def fit_logistic4(pred: Sequence[float], mos: Sequence[float]) -> np.ndarray:
    """Least-squares fit of `logistic4` mapping predictions onto MOS; returns (b1, b2, b3, b4)."""
    p, m = _pair(pred, mos)
    p0 = [m.max(), m.min(), float(np.mean(p)), float(np.std(p)) or 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        # "trf" steps finite differences by max(1, |b|); the default LM steps by |b| and stalls
        # when the initial centre b3 is ~0 (a mean-centred predictor).
        params, _ = optimize.curve_fit(logistic4, p, m, p0=p0, method="trf", max_nfev=20000)
    return params


def plcc(pred: Sequence[float], mos: Sequence[float], fit: str | None = None) -> float:
    """Pearson linear correlation; `fit="logistic4"` first maps pred through the VQEG logistic."""
    p, m = _pair(pred, mos)
    if fit == "logistic4":
        # If the fit does not converge, report the plain PLCC rather than fail an eval.
        with contextlib.suppress(RuntimeError):
            p = logistic4(p, *fit_logistic4(p, m))
    elif fit is not None:
        raise ValueError(f"fit must be None or 'logistic4', got {fit!r}")
    return _corr(stats.pearsonr, p, m)


def rmse(pred: Sequence[float], mos: Sequence[float]) -> float:
    p, m = _pair(pred, mos)
    return float(np.sqrt(np.mean((p - m) ** 2)))


def mae(pred: Sequence[float], mos: Sequence[float]) -> float:
    p, m = _pair(pred, mos)
    return float(np.mean(np.abs(p - m)))


def summary(pred: Sequence[float], mos: Sequence[float]) -> dict[str, float]:
    """All metrics at once; NaN where fewer than 2 pairs make them undefined."""
    if len(pred) < 2:
        return {k: float("nan") for k in ("srcc", "krcc", "plcc", "plcc_logistic", "rmse", "mae")}
    return {
        "srcc": srcc(pred, mos), "krcc": krcc(pred, mos), "plcc": plcc(pred, mos),
        "plcc_logistic": plcc(pred, mos, fit="logistic4"),
        "rmse": rmse(pred, mos), "mae": mae(pred, mos),
    }
