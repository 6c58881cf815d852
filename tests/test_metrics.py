"""Metrics against hand-computed values and scipy's reference implementations."""

import math

import numpy as np
import pytest
from scipy import stats

from qponder_mlx import metrics


def test_srcc_hand_computed():
    # ranks pred: 1,2,3,4,5 ; mos: 2,1,4,3,5 -> d^2 = 1+1+1+1+0 = 4 ; 1 - 6*4/(5*24) = 0.8
    assert metrics.srcc([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


def test_krcc_hand_computed():
    # pairs: 10 ; discordant: (1,2) and (3,4) -> concordant 8 ; tau = (8-2)/10 = 0.6
    assert metrics.krcc([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.6)


def test_plcc_rmse_mae_hand_computed():
    pred, mos = [1, 2, 3], [2, 4, 6]
    assert metrics.plcc(pred, mos) == pytest.approx(1.0)
    # errors 1, 2, 3 -> mae 2, rmse sqrt(14/3)
    assert metrics.mae(pred, mos) == pytest.approx(2.0)
    assert metrics.rmse(pred, mos) == pytest.approx(math.sqrt(14 / 3))


def test_against_scipy_on_random_data():
    rng = np.random.default_rng(0)
    p, m = rng.random(50), rng.random(50)
    assert metrics.srcc(p, m) == pytest.approx(stats.spearmanr(p, m)[0])
    assert metrics.krcc(p, m) == pytest.approx(stats.kendalltau(p, m)[0])
    assert metrics.plcc(p, m) == pytest.approx(stats.pearsonr(p, m)[0])


def test_logistic_fit_recovers_a_monotone_nonlinearity():
    x = np.linspace(-3, 3, 40)
    mos = metrics.logistic4(x, 5.0, 1.0, 0.3, 0.8)
    assert metrics.plcc(x, mos) < 0.99  # linear PLCC is hurt by the S-curve
    assert metrics.plcc(x, mos, fit="logistic4") == pytest.approx(1.0, abs=1e-6)
    assert metrics.srcc(x, mos) == pytest.approx(1.0)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="pred has 2 values but mos has 3"):
        metrics.srcc([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        metrics.plcc([1, float("nan"), 3], [1, 2, 3])
    with pytest.raises(ValueError, match="fit must be"):
        metrics.plcc([1, 2, 3], [1, 2, 3], fit="cubic")
    assert math.isnan(metrics.srcc([3, 3, 3], [1, 2, 3]))  # constant predictions
