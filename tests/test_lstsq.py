import warnings

import pytest
import torch

from snnet.lstsq import AffineLstsq


def _known_map(n=400, d_in=12, d_out=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * 3 + 5
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    return x, w, b, x @ w.T + b


def test_recovers_known_affine_map_exactly():
    x, w, b, y = _known_map()
    system = AffineLstsq(1, 12, 7)
    system.update(0, x, y)
    w_hat, b_hat = system.solve()
    assert ((w_hat[0] - w).norm() / w.norm()) < 1e-6
    assert ((b_hat[0] - b).norm() / b.norm()) < 1e-6


def test_one_batch_equals_many_batches():
    x, _, _, y = _known_map(seed=1)
    y = y + 0.1 * torch.randn_like(y)  # not exactly representable: the solution depends on all rows
    one, many = AffineLstsq(1, 12, 7), AffineLstsq(1, 12, 7)
    one.update(0, x, y)
    for xs, ys in zip(x.split(37), y.split(37)):
        many.update(0, xs, ys)
    for a, b in zip(one.solve(), many.solve()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_shared_layer_is_solved_jointly_not_averaged():
    x1, _, _, y1 = _known_map(seed=2)
    x2, _, _, y2 = _known_map(seed=3)
    joint = AffineLstsq(1, 12, 7)
    joint.update(0, x1, y1)
    joint.update(0, x2, y2)
    w, b = joint.solve()
    full = torch.linalg.lstsq(torch.cat([torch.cat([x1, x2]), torch.ones(800, 1, dtype=torch.float64)], 1), torch.cat([y1, y2])).solution
    torch.testing.assert_close(w[0], full[:-1].T, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(b[0], full[-1], rtol=1e-7, atol=1e-7)


def test_rank_deficient_gives_finite_min_norm_weights_and_warns():
    x, _, _, y = _known_map(n=5)  # fewer samples than features
    system = AffineLstsq(1, 12, 7)
    system.update(0, x.float(), y.float())
    with pytest.warns(UserWarning, match="rank-deficient"):
        w, b = system.solve()
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    pinv = torch.linalg.pinv(torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], 1)) @ y
    torch.testing.assert_close(w[0], pinv[:-1].T.to(w), rtol=1e-4, atol=1e-4)
    # it still fits the data it saw
    torch.testing.assert_close(x @ w[0].T + b[0], y, rtol=1e-4, atol=1e-4)


def test_ridge_matches_closed_form_and_needs_no_warning():
    x, _, _, y = _known_map(n=5)
    system = AffineLstsq(1, 12, 7)
    system.update(0, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w, b = system.solve(ridge=0.5)
    xa = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], 1)
    expected = torch.linalg.solve(xa.T @ xa + 0.5 * torch.eye(13, dtype=torch.float64), xa.T @ y)
    torch.testing.assert_close(w[0], expected[:-1].T)
    torch.testing.assert_close(b[0], expected[-1])


def test_bad_shapes_and_empty_maps():
    system = AffineLstsq(2, 4, 3)
    with pytest.raises(ValueError, match="expects 4 -> 3"):
        system.update(0, torch.randn(10, 5), torch.randn(10, 3))
    with pytest.raises(ValueError, match="equal n"):
        system.update(0, torch.randn(10, 4), torch.randn(9, 3))
    system.update(0, torch.randn(10, 4), torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"maps \[1\] received no data"):
        system.solve()
