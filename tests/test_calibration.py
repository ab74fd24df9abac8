import numpy as np
import pytest

from pipeline.training.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    nll,
)


def _overconfident(n=2000, k=10, accuracy=0.8, seed=0):
    """labels (N,) and pred_probs (N, K) of a model right `accuracy` of the time but always
    about 99% sure: the over-confidence of a long recipe on a small set."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    predicted = np.where(rng.random(n) < accuracy, labels, (labels + rng.integers(1, k, n)) % k)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), predicted] += 8.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return labels, probs / probs.sum(1, keepdims=True)


def test_temperature_fitted_on_validation_lowers_ece_on_held_out_rows():
    labels, probs = _overconfident()
    fit, held = slice(0, 1000), slice(1000, None)
    t = fit_temperature(labels[fit], probs[fit])
    assert t > 1.5  # over-confident: softened
    before = expected_calibration_error(labels[held], probs[held])[0]
    after = expected_calibration_error(labels[held], apply_temperature(probs[held], t))[0]
    assert before > 0.15 and after < 0.35 * before
    assert nll(labels[held], apply_temperature(probs[held], t)) < nll(labels[held], probs[held])
    # scaling never changes the predicted class
    assert (apply_temperature(probs, t).argmax(1) == probs.argmax(1)).all()


def test_calibrated_probabilities_are_left_alone():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), 3000)
    labels = np.array([rng.choice(5, p=p) for p in probs])  # drawn from the probabilities
    assert fit_temperature(labels, probs) == pytest.approx(1.0, abs=0.15)
    assert fit_temperature(labels[:0], probs[:0]) == 1.0
    assert apply_temperature(probs, 1.0) is probs
