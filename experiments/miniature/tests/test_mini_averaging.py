"""WeightAverage: the running mean against numpy's mean, its schedule, and its checkpoint state."""

import mlx.core as mx
import numpy as np
import pytest
from averaging import WeightAverage


def _points(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"a": rng.normal(size=(3, 4)).astype(np.float32),
             "b": rng.normal(size=(5,)).astype(np.float32) * 100} for _ in range(n)]


def test_running_mean_equals_the_plain_mean_of_the_points():
    pts = _points(7)
    avg = WeightAverage(every=3)
    assert avg.weights() is None  # nothing folded in yet: callers keep the model's own weights
    for p in pts:
        avg.add({k: mx.array(v) for k, v in p.items()})
    assert avg.count == 7
    for k in ("a", "b"):
        np.testing.assert_allclose(np.array(avg.weights()[k]),
                                   np.mean([p[k] for p in pts], axis=0), rtol=1e-5, atol=1e-5)


def test_due_follows_every_and_zero_is_off():
    assert [s for s in range(1, 31) if WeightAverage(10).due(s)] == [10, 20, 30]
    assert not any(WeightAverage(0).due(s) for s in range(1, 100))


def test_mismatched_tensors_are_refused():
    avg = WeightAverage(1)
    avg.add({"a": mx.zeros(2)})
    with pytest.raises(ValueError, match="do not match"):
        avg.add({"b": mx.zeros(2)})
