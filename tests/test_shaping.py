import numpy as np
import pytest

from es_mpi.shaping import SHAPINGS, centered_rank, shape, zscore


def test_zscore():
    r = np.array([1.0, 2.0, 3.0, 6.0])
    z = zscore(r)
    np.testing.assert_allclose(z, (r - r.mean()) / r.std())
    assert abs(z.mean()) < 1e-12 and abs(z.std() - 1) < 1e-12


def test_zscore_of_equal_rewards_is_zero():
    assert np.array_equal(zscore(np.full(5, -3.0)), np.zeros(5))


def test_centered_rank():
    z = centered_rank(np.array([10.0, -1.0, 3.0, 7.0]))
    np.testing.assert_allclose(z, [0.5, -0.5, -1 / 6, 1 / 6], rtol=1e-12)


def test_centered_rank_ties_share_average_rank():
    z = centered_rank(np.array([0.0, 1.0, 1.0, 0.0, 2.0]))
    # ranks 0,1 -> 0.5 ; ranks 2,3 -> 2.5 ; rank 4
    np.testing.assert_allclose(z, np.array([0.5, 2.5, 2.5, 0.5, 4.0]) / 4 - 0.5)
    assert centered_rank(np.ones(4)).tolist() == [0.0] * 4


@pytest.mark.parametrize("method", sorted(SHAPINGS))
def test_shapings_are_centered_and_monotone(method):
    rng = np.random.default_rng(0)
    r = rng.normal(size=31)
    z = shape(r, method)
    assert z.dtype == np.float64
    assert abs(z.sum()) < 1e-9
    order = np.argsort(r)
    assert (np.diff(z[order]) > 0).all()
    # invariant to shifting the rewards
    np.testing.assert_allclose(shape(r + 100.0, method), z, atol=1e-9)
