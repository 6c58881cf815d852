"""bench/stem_probe.py's softmax class probe: its gradient descent reaches the optimum scipy finds
for the same objective, and its read-out is the picked class's MOS."""

from __future__ import annotations

import numpy as np
import pytest
from bench_loader import load_bench
from scipy.optimize import minimize


@pytest.fixture(scope="module")
def stem_probe():
    return load_bench("stem_probe")


def test_softmax_probe_reaches_the_scipy_optimum(stem_probe):
    rng = np.random.default_rng(0)
    c = rng.integers(0, 3, 90)
    x = rng.normal(size=(90, 4)) + np.eye(3, 4)[c] * 1.5
    l2 = 0.1
    w, b = stem_probe.softmax_probe(x, c, 3, l2=l2, steps=4000, lr=0.5)

    def loss(theta):
        ww, bb = theta[:12].reshape(4, 3), theta[12:]
        z = x @ ww + bb
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        return (lse - z[np.arange(90), c]).mean() + l2 / 2 * (ww ** 2).sum()

    ref = minimize(loss, np.zeros(15), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(w, ref[:12].reshape(4, 3), atol=1e-5)
    np.testing.assert_allclose(b - b.mean(), ref[12:] - ref[12:].mean(), atol=1e-5)


def test_class_readout_answers_the_picked_class_mos(stem_probe):
    rng = np.random.default_rng(1)
    rows, feats = [], []
    for kind, level, mos, centre in [("blur", 1, 4.6, 0.0), ("blur", 2, 4.4, 3.0),
                                     ("jpeg", 1, 4.3, 6.0)]:
        for _ in range(20):
            rows.append({"distortion": kind, "level": level, "mos": mos})
            feats.append(rng.normal(centre, 0.3, size=2))
    test = np.array([[0.1, -0.1], [2.9, 3.2], [6.1, 5.8]])
    np.testing.assert_array_equal(stem_probe.class_readout(np.array(feats), rows, test),
                                  [4.6, 4.4, 4.3])


def test_probe_reports_the_class_probes_level_accuracy_and_mos_gap(stem_probe, monkeypatch):
    rng = np.random.default_rng(2)
    levels = [("blur", 1, 4.6, 0.0), ("blur", 2, 4.4, 3.0), ("jpeg", 1, 4.3, 6.0)]
    tr = [{"distortion": k, "level": lv, "mos": m, "reference": "a"}
          for k, lv, m, _ in levels for _ in range(20)]
    xtr = np.array([rng.normal(c, 0.3, size=2) for *_, c in levels for _ in range(20)])
    # four held-out images: blur 1, blur 2 and jpeg 1 where they belong; a blur-1 image that
    # looks like blur 2 (picked 4.4 against 4.6): 3 of 4 right, MOS gap 0.2 / 4 = 0.05
    te = [{"distortion": k, "level": lv, "mos": m, "reference": "b"} for k, lv, m, _ in levels]
    te.append({"distortion": "blur", "level": 1, "mos": 4.6, "reference": "b"})
    xte = np.array([[0.0, 0.0], [3.0, 3.0], [6.0, 6.0], [3.1, 2.9]])
    monkeypatch.setattr(stem_probe, "tower_features", lambda *a: [(xtr, tr), (xte, te)])
    out = stem_probe.probe(None, None, "test")["classes"]
    assert out["level_accuracy"] == 0.75
    assert out["mos_gap"] == pytest.approx(0.05)


def test_mlp_probe_separates_xor_where_the_linear_probe_cannot(stem_probe):
    """Four clusters in an XOR layout: no linear map puts them in their two classes."""
    rng = np.random.default_rng(3)
    centres = np.array([[1, 1], [-1, -1], [1, -1], [-1, 1]], dtype=float)
    labels = np.array([0, 0, 1, 1])
    pick = rng.integers(0, 4, 200)
    x, c = centres[pick] + rng.normal(0, 0.2, (200, 2)), labels[pick]
    probs = stem_probe.mlp_probe(x, c, 2, hidden=16, steps=2000, lr=0.1)(centres)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    assert (probs.argmax(1) == labels).all() and probs.max(1).min() > 0.9
    w, b = stem_probe.softmax_probe(x, c, 2, steps=2000)
    assert ((centres @ w + b).argmax(1) == labels).sum() <= 3  # at best 3 of the 4 clusters


def test_readout_ceiling_sweep_scores_each_readout_by_spearman(monkeypatch):
    ceiling = load_bench("readout_ceiling")
    rng = np.random.default_rng(4)
    levels = [("blur", 1, 4.6, 0.0), ("blur", 2, 4.4, 3.0), ("jpeg", 1, 4.3, 6.0)]
    tr = [{"distortion": k, "level": lv, "mos": m} for k, lv, m, _ in levels for _ in range(20)]
    xtr = np.array([rng.normal(c, 0.3, size=2) for *_, c in levels for _ in range(20)])
    te = [{"mos": m} for _, _, m, _ in levels] + [{"mos": 4.6}]
    xte = np.array([[0.0, 0.0], [3.0, 3.0], [6.0, 6.0], [3.1, 2.9]])  # the last: blur 1 as 2
    out = ceiling.sweep(xtr, tr, {"": (xte, te)})[""]
    # every class probe picks 4.6 / 4.4 / 4.3 / 4.4 (argmax): SRCC by scipy of those against
    # the truth
    from scipy.stats import spearmanr
    want = spearmanr([4.6, 4.4, 4.3, 4.4], [4.6, 4.4, 4.3, 4.6])[0]
    assert {k for k in out if k.endswith("argmax")} == {
        "linear l2=0.0001 argmax", "linear l2=0.001 argmax", "linear l2=0.01 argmax",
        "mlp 64 argmax", "mlp 256 argmax"}
    for k in out:
        if k.endswith("argmax"):
            assert out[k] == pytest.approx(want), k
    assert {"ridge", "knn5", "knn25"} <= set(out)
