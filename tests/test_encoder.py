"""The fine-tuned sentence encoder (`natprints.reference.encoder`): a scikit-learn classifier that
learns, stops early on its validation texts, is seeded, and reloads from safetensors to identical
predictions."""

import numpy as np
import pytest

from natprints.errors import NatprintsError
from natprints.reference.encoder import ENCODER_FILE, WEIGHTS_FILE, FineTunedEncoder

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the cat slept on a mat", "a dog barked in the park"] * 3
LABELS = np.array(["cat", "dog", "cat", "dog"] * 3)


def _fit(**kw):
    settings = {"epochs": 2, "batch_size": 4, "lr": 1e-4, "threads": 1} | kw
    return FineTunedEncoder(**settings).fit(TEXTS, LABELS, validation=(TEXTS[:4], LABELS[:4]))


def test_fits_predicts_and_reloads_to_identical_predictions(tmp_path):
    from sklearn.base import clone

    model = _fit()
    assert list(model.classes_) == ["cat", "dog"]
    assert [e["epoch"] for e in model.history_] == [1, 2] and model.best_epoch_ in (1, 2)
    losses = [e["validation_loss"] for e in model.history_]
    assert losses[1] < losses[0] < np.log(2)  # it learns: below the uniform classifier's log-loss
    proba = model.predict_proba(TEXTS[:4])
    assert proba.shape == (4, 2) and np.allclose(proba.sum(1), 1)
    assert list(model.predict(TEXTS[:4])) == ["cat", "dog", "cat", "dog"]
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([ENCODER_FILE, WEIGHTS_FILE])
    loaded = FineTunedEncoder.load(tmp_path / "m")
    assert np.array_equal(loaded.predict_proba(TEXTS[:4]), proba)
    assert loaded.get_params() == model.get_params() == clone(model).get_params()
    assert np.array_equal(_fit().predict_proba(TEXTS[:4]), proba)  # seeded: a refit is the same model
    assert not np.array_equal(_fit(seed=1).predict_proba(TEXTS[:4]), proba)


def test_stops_early_and_keeps_the_best_epoch():
    # a learning rate this high wrecks the encoder after its first epoch: the weights of the epoch with
    # the lowest validation loss are kept, and training stops `patience` epochs later
    model = _fit(epochs=4, lr=5e-2, patience=1)
    losses = [e["validation_loss"] for e in model.history_]
    assert len(losses) < 4 and model.best_epoch_ == int(np.argmin(losses)) + 1
    kept = -np.log(model.predict_proba(TEXTS[:4])[np.arange(4), [0, 1, 0, 1]]).mean()
    assert kept == pytest.approx(min(losses), rel=1e-6)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(NatprintsError, match="at least two sources"):
        FineTunedEncoder(epochs=1).fit(TEXTS[:2], ["cat", "cat"])
    with pytest.raises(NatprintsError, match="not a saved fine-tuned encoder"):
        FineTunedEncoder.load(tmp_path)
