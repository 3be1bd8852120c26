"""scikit-learn's own tools run on the mixtures: clone, tags, check_is_fitted, Pipeline,
GridSearchCV, cross_val_score, the HTML repr, its exceptions and warnings."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import get_tags
from sklearn.utils.validation import check_is_fitted

from ppl_vae.errors import NotFittedError
from ppl_vae.mixture import BernoulliMixture, ConvergenceWarning, GaussianMixture

MIXTURES = [GaussianMixture, BernoulliMixture]

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _three_blobs(n=300, seed=0, stretch=1.0):
    """Three round, well separated clusters in 2-D (float64) and their labels: three
    components are clearly better than one or two. ``stretch`` scales the second feature."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(3, size=n)
    centres = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    x = centres[labels] + rng.normal(size=(n, 2))
    return x * np.array([1.0, stretch]) + np.array([5.0, -3.0 * stretch]), labels


def _binary(n=120, d=6, seed=0):
    rng = np.random.default_rng(seed)
    probs = np.array([[0.9] * 3 + [0.1] * 3, [0.1] * 3 + [0.9] * 3])[rng.integers(2, size=n)]
    return (rng.random((n, d)) < probs).astype(np.float64)


def _data(mixture):
    return _three_blobs()[0] if mixture is GaussianMixture else _binary()


@pytest.mark.parametrize("mixture", MIXTURES)
def test_the_mixtures_are_scikit_learn_density_estimators(mixture):
    tags = get_tags(mixture(2))
    assert tags.estimator_type == "density_estimator"
    assert tags.target_tags.required is False  # fit(X) with no y


@pytest.mark.parametrize("mixture", MIXTURES)
def test_clone_gives_an_unfitted_estimator_with_equal_parameters(mixture):
    m = mixture(3, tol=1e-4, max_iter=7, seed=5).fit(_data(mixture))
    copy = clone(m)
    assert type(copy) is mixture and copy is not m
    assert copy.get_params() == m.get_params() and copy.get_params()["max_iter"] == 7
    assert not hasattr(copy, "weights_") and hasattr(m, "weights_")
    assert torch.equal(copy.fit(_data(mixture)).means_, m.means_)  # same settings, same fit


@pytest.mark.parametrize("mixture", MIXTURES)
def test_check_is_fitted_raises_before_fit_and_not_after(mixture):
    m = mixture(2, seed=0)
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(m)
    check_is_fitted(m.fit(_data(mixture)))


@pytest.mark.parametrize("mixture", MIXTURES)
def test_except_sklearn_not_fitted_error_catches_ours(mixture):
    assert issubclass(NotFittedError, SklearnNotFittedError)
    with pytest.raises(SklearnNotFittedError, match="is not fitted yet"):
        mixture(2).predict(_data(mixture))


@pytest.mark.parametrize("mixture", MIXTURES)
def test_an_error_filter_on_sklearn_s_convergence_warning_catches_ours(mixture):
    assert ConvergenceWarning is SklearnConvergenceWarning
    x = _data(mixture)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SklearnConvergenceWarning)
        with pytest.raises(SklearnConvergenceWarning, match="max_iter=1 iterations"):
            mixture(3, tol=0, max_iter=1, seed=0).fit(x)
        mixture(3, tol=1e-2, max_iter=500, seed=0).fit(x)  # converges: no warning, no error


@pytest.mark.parametrize("mixture", MIXTURES)
def test_fit_takes_y_second_and_ignores_it(mixture):
    x = _data(mixture)
    y = np.arange(len(x)) % 2
    plain = mixture(2, seed=0).fit(x)
    with_y = mixture(2, seed=0).fit(x, y)
    assert torch.equal(with_y.means_, plain.means_)
    assert torch.equal(mixture(2, seed=0).fit_predict(x, y), plain.predict(x))
    with pytest.raises(TypeError, match="positional"):  # starting parameters are keywords
        mixture(2).fit(x, None, np.full(2, 0.5))


def test_a_pipeline_fits_with_y_and_scores_as_scaling_by_hand():
    x, y = _three_blobs(stretch=1000.0)
    pipe = make_pipeline(StandardScaler(), GaussianMixture(3, seed=0)).fit(x, y)
    scaled = (x - x.mean(0)) / x.std(0)
    by_hand = GaussianMixture(3, seed=0).fit(scaled)
    assert pipe.score(x) == pytest.approx(by_hand.score(scaled), rel=1e-12)
    assert torch.equal(pipe.predict(x), by_hand.predict(scaled))
    # and the score is the mean log-density of the scaled points, not of the raw ones
    raw = GaussianMixture(3, seed=0).fit(x).score(x)
    assert abs(pipe.score(x) - raw) > 5


@pytest.mark.parametrize("mixture", MIXTURES)
def test_cross_val_score_equals_a_manual_loop_over_the_folds(mixture):
    x = _data(mixture)
    y = np.zeros(len(x))
    estimator = mixture(2, seed=0)
    scores = cross_val_score(estimator, x, y, cv=KFold(3))
    manual = [mixture(2, seed=0).fit(x[train]).score(x[test]) for train, test in KFold(3).split(x)]
    assert scores.tolist() == pytest.approx(manual, rel=1e-12)
    assert len(set(manual)) == 3  # three different numbers, none of them NaN
    assert np.isfinite(scores).all()


def test_grid_search_picks_the_number_of_components_the_data_have():
    x, _ = _three_blobs()
    grid = GridSearchCV(GaussianMixture(seed=0), {"n_components": [1, 2, 3]}, cv=3).fit(x)
    assert grid.best_params_ == {"n_components": 3}
    scores = grid.cv_results_["mean_test_score"]
    assert np.isfinite(scores).all() and scores[2] > scores[1] + 0.2 > scores[0] + 0.7
    # best_score_ is the mean of the held-out scores of the chosen setting, fold by fold
    folds = [
        GaussianMixture(3, seed=0).fit(x[train]).score(x[test]) for train, test in KFold(3).split(x)
    ]
    assert grid.best_score_ == pytest.approx(np.mean(folds), rel=1e-12)
    assert grid.best_estimator_.n_components == 3 and hasattr(grid.best_estimator_, "means_")


def test_grid_search_over_a_pipeline_scores_every_candidate():
    # one feature 1000 times the other: unscaled, k-means starts three components badly
    x, _ = _three_blobs(stretch=1000.0)
    pipe = Pipeline([("scale", StandardScaler()), ("gm", GaussianMixture(seed=0))])
    grid = GridSearchCV(pipe, {"gm__n_components": [1, 2, 3]}, cv=3, error_score="raise")
    grid.fit(x)
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()
    assert grid.best_params_ == {"gm__n_components": 3}


@pytest.mark.parametrize("mixture", MIXTURES)
def test_the_html_repr_names_the_estimator_and_its_changed_settings(mixture):
    m = mixture(3, seed=7)
    html = m._repr_html_()
    assert mixture.__name__ in html and "seed" in html and "7" in html
    assert repr(m) == f"{mixture.__name__}(n_components=3, seed=7)"
    fitted = m.fit(_data(mixture))._repr_html_()
    assert "Fitted attributes" in fitted and "means_" in fitted and "means_" not in html
