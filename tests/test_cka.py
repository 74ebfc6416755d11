"""Tests for snnet.cka. Each property is checked against data where a wrong formula would give a
different number (e.g. non-isotropic scaling must change CKA; the published Kornblith et al.
demo values are recomputed from the same NumPy seed)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from snnet.cka import (
    MinibatchCKA,
    cka_matrix,
    flatten_features,
    gram_linear_cka,
    linear_cka,
    rbf_cka,
    unbiased_hsic,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(_randn(d, d, seed=seed))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed orthogonal matrix


@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    x = _randn(64, 12, seed=1)
    y = x @ _randn(12, 9, seed=2) + 0.5 * _randn(64, 9, seed=3)
    return x, y


@pytest.fixture
def kornblith_demo() -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly the data of the google-research representation_similarity Demo notebook."""
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return torch.from_numpy(x), torch.from_numpy(y)


# ---------------------------------------------------------------- basic properties


@pytest.mark.parametrize("method", ["feature", "gram"])
def test_self_similarity_is_one(method: str) -> None:
    x = _randn(50, 20, seed=4) * 3 + 7
    out = linear_cka(x, x, method=method)
    assert out.dtype == torch.float64 and out.ndim == 0
    assert abs(out.item() - 1.0) < 1e-10


def test_float32_input_with_large_mean_is_centred_in_float64() -> None:
    # The reference notes the pitfall: float32 build-then-centre with offset 1000 collapses CKA.
    x = _randn(200, 16, seed=5)
    y = x @ _randn(16, 16, seed=6) + 2.0 * _randn(200, 16, seed=7)
    ref = linear_cka(x, y).item()
    got = linear_cka((x + 1000).float(), (y + 1000).float()).item()
    assert abs(got - ref) < 1e-4  # only float32 rounding of the inputs (~1e-7 * 1000) remains


def test_invariant_to_orthogonal_transform(xy) -> None:
    x, y = xy
    base = linear_cka(x, y)
    assert torch.allclose(linear_cka(x @ _orthogonal(12, 10), y), base, atol=1e-12, rtol=0)
    assert torch.allclose(linear_cka(x, y @ _orthogonal(9, 11)), base, atol=1e-12, rtol=0)


def test_invariant_to_isotropic_scaling(xy) -> None:
    x, y = xy
    base = linear_cka(x, y)
    assert torch.allclose(linear_cka(37.5 * x, y), base, atol=1e-12, rtol=0)
    assert torch.allclose(linear_cka(x, 1e-3 * y), base, atol=1e-12, rtol=0)


def test_not_invariant_to_non_isotropic_scaling(xy) -> None:
    x, y = xy
    base = linear_cka(x, y)
    scale = torch.ones(12, dtype=torch.float64)
    scale[:3] = 10.0
    changed = linear_cka(x * scale, y)
    assert abs(changed.item() - base.item()) > 1e-2


def test_symmetric_and_bounded() -> None:
    for seed in range(5):
        x = _randn(30, 7, seed=seed)
        y = x[:, :5] ** 2 + _randn(30, 5, seed=100 + seed)
        a, b = linear_cka(x, y), linear_cka(y, x)
        assert abs(a.item() - b.item()) < 1e-12
        assert 0.0 <= a.item() <= 1.0


@pytest.mark.parametrize("n,d1,d2", [(10, 40, 25), (200, 8, 13)])  # n < d and n > d
def test_feature_formula_matches_gram_formula(n: int, d1: int, d2: int) -> None:
    x = _randn(n, d1, seed=20)
    y = x[:, :1] * _randn(1, d2, seed=21) + _randn(n, d2, seed=22)
    ref = gram_linear_cka(x, y)
    assert abs(linear_cka(x, y, method="feature").item() - ref.item()) < 1e-6
    assert abs(linear_cka(x, y, method="gram").item() - ref.item()) < 1e-6
    assert abs(linear_cka(x, y, method="auto").item() - ref.item()) < 1e-6


def test_flatten_features_for_maps_and_tokens() -> None:
    maps = _randn(8, 3, 4, 4, seed=30)
    tokens = _randn(8, 5, 6, seed=31)
    assert flatten_features(maps).shape == (8, 48)
    assert flatten_features(tokens).shape == (8, 30)
    assert torch.allclose(linear_cka(maps, tokens), linear_cka(maps.reshape(8, -1), tokens.reshape(8, -1)))


# ---------------------------------------------------------------- published reference values


def test_kornblith_demo_reference_values(kornblith_demo) -> None:
    x, y = kornblith_demo
    assert round(linear_cka(x, y).item(), 5) == 0.55761
    assert round(gram_linear_cka(x, y).item(), 5) == 0.55761
    assert round(rbf_cka(x, y, sigma=0.5).item(), 5) == 0.65483
    # Debiased linear CKA = one minibatch holding all samples (unbiased HSIC throughout).
    mb = MinibatchCKA()
    mb.update(x, y)
    assert round(mb.compute().item(), 5) == 0.51346


# ---------------------------------------------------------------- cka_matrix


@pytest.mark.parametrize("n", [12, 300])  # n=12: Gram route is cheaper; n=300: feature route
def test_cka_matrix_matches_pairwise(n: int) -> None:
    base = _randn(n, 6, seed=40)
    xs = [base @ _randn(6, d, seed=41 + d) + 0.3 * _randn(n, d, seed=60 + d) for d in (5, 17, 9)]
    ys = [torch.tanh(base @ _randn(6, d, seed=80 + d)) for d in (11, 4)] + [_randn(n, 2, 3, seed=99)]
    expected = torch.stack([torch.stack([linear_cka(x, y) for y in ys]) for x in xs])
    for method in ("feature", "gram", "auto"):
        got = cka_matrix(xs, ys, method=method)
        assert got.shape == (3, 3) and got.dtype == torch.float64
        assert torch.allclose(got, expected, atol=1e-10, rtol=0), method
    same = cka_matrix(xs)
    assert torch.allclose(same, cka_matrix(xs, xs), atol=1e-12, rtol=0)
    assert torch.allclose(torch.diagonal(same), torch.ones(3, dtype=torch.float64), atol=1e-10)


def test_cka_matrix_auto_route_choice() -> None:
    from snnet.cka import _choose_route

    assert _choose_route(n=256, dx=[16384] * 3, dy=[4096] * 3, shared=False) == "gram"
    assert _choose_route(n=100_000, dx=[64, 128], dy=[64], shared=False) == "feature"


# ---------------------------------------------------------------- unbiased HSIC / minibatch


def _hsic1_bruteforce(x: torch.Tensor, y: torch.Tensor) -> float:
    """Song et al. (2012) eq. 5 on *uncentred* Grams with explicit ones vectors (torch-cka style)."""
    k, l = x @ x.T, y @ y.T
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    n = k.shape[0]
    one = torch.ones(n, 1, dtype=torch.float64)
    val = torch.trace(k @ l) + (one.T @ k @ one @ one.T @ l @ one).item() / ((n - 1) * (n - 2))
    val -= (one.T @ k @ l @ one).item() * 2 / (n - 2)
    return val.item() / (n * (n - 3))


def test_unbiased_hsic_matches_definition_and_is_shift_invariant() -> None:
    x = _randn(20, 6, seed=50)
    y = x[:, :4] + _randn(20, 4, seed=51)
    ref = _hsic1_bruteforce(x, y)
    assert math.isclose(unbiased_hsic(x, y).item(), ref, rel_tol=1e-10)
    assert math.isclose(unbiased_hsic(x + 5.0, y - 3.0).item(), ref, rel_tol=1e-8)


def test_minibatch_matrix_matches_single_pairs() -> None:
    base = _randn(96, 5, seed=52)
    xs = [base @ _randn(5, d, seed=53 + d) + _randn(96, d, seed=70 + d) for d in (3, 8)]
    ys = [base[:, :2] ** 2, _randn(96, 4, seed=90)]
    mat, pairs = MinibatchCKA(), [[MinibatchCKA() for _ in ys] for _ in xs]
    for b in range(0, 96, 32):
        sl = slice(b, b + 32)
        mat.update([x[sl] for x in xs], [y[sl] for y in ys])
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                pairs[i][j].update(x[sl], y[sl])
    expected = torch.tensor([[p.compute().item() for p in row] for row in pairs], dtype=torch.float64)
    assert torch.allclose(mat.compute(), expected, atol=1e-12, rtol=0)


def test_minibatch_converges_to_population_and_full_batch() -> None:
    """x ~ N(0, I_d), y = x W + s e: population linear CKA is known in closed form,
    ||W||_F^2 / (sqrt(d) ||W^T W + s^2 I||_F). The minibatch (unbiased) estimator's error shrinks
    like 1/sqrt(#samples); the full-batch biased estimator is also consistent, so their gap shrinks
    too. Tolerance: with 256 batches x 64 = 16384 samples the per-seed standard deviation of the
    estimate here is 2.2e-3 (measured over 20 seeds), so 0.01 on the mean |error| of 4 seeds is
    ~9 standard errors of slack, while a wrong estimator -- biased HSIC per 64-sample batch -- is
    off by 0.033 and fails. Going from 4 to 256 batches (64x data) must at least halve the error
    (expected 8x)."""
    d, s, bs = 8, 1.5, 64
    w = _randn(d, d, seed=7)
    pop = (w.square().sum() / (math.sqrt(d) * torch.linalg.matrix_norm(w.T @ w + s**2 * torch.eye(d)))).item()

    def errors(num_batches: int) -> tuple[float, float]:
        err_mb, err_gap = [], []
        for seed in range(4):
            x = _randn(num_batches * bs, d, seed=1000 + seed)
            y = x @ w + s * _randn(num_batches * bs, d, seed=2000 + seed)
            mb = MinibatchCKA()
            for xb, yb in zip(x.split(bs), y.split(bs)):
                mb.update(xb, yb)
            val = mb.compute().item()
            err_mb.append(abs(val - pop))
            err_gap.append(abs(val - linear_cka(x, y).item()))
        return sum(err_mb) / 4, sum(err_gap) / 4

    few_mb, few_gap = errors(4)
    many_mb, many_gap = errors(256)
    assert many_mb < 0.01 and many_gap < 0.01
    assert many_mb < few_mb / 2 and many_gap < few_gap / 2  # sqrt(64) = 8x more data


def test_minibatch_rejects_small_batches_and_changing_lists() -> None:
    mb = MinibatchCKA()
    with pytest.raises(ValueError, match=r"at least 4 samples.*\(3, 5\)"):
        mb.update(_randn(3, 5), _randn(3, 2))
    mb.update([_randn(8, 5), _randn(8, 3)], [_randn(8, 2)])
    with pytest.raises(ValueError, match="changed between updates"):
        mb.update([_randn(8, 5)], [_randn(8, 2)])
    with pytest.raises(RuntimeError):
        MinibatchCKA().compute()


# ---------------------------------------------------------------- RBF


def test_rbf_cka_self_and_independent() -> None:
    """Independent X, Y: population CKA is 0, but the biased (centred-Gram) estimator has a positive
    floor of order (effective kernel dimension)/n, larger for narrow kernels. At n=800 that floor is
    < 0.1 for sigma in {0.5, 0.8, 1} (measured 0.02-0.08) and it must shrink as n grows; related
    data (y = x + 0.3 noise) stays near 0.9."""
    x = _randn(800, 10, seed=60)
    y = _randn(800, 10, seed=61)
    for sigma in (None, 0.5, 0.8):
        assert abs(rbf_cka(x, x, sigma=sigma).item() - 1.0) < 1e-10
        assert rbf_cka(x, y, sigma=sigma).item() < 0.1
        assert rbf_cka(x, x + 0.3 * y, sigma=sigma).item() > 0.8
    assert rbf_cka(x, y, sigma=0.5).item() < rbf_cka(x[:200], y[:200], sigma=0.5).item() / 2
    with pytest.raises(ValueError, match="sigma"):
        rbf_cka(x, y, sigma=0.0)


# ---------------------------------------------------------------- shape errors


def test_shape_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"same number of samples.*\(10, 3\).*\(11, 3\)"):
        linear_cka(_randn(10, 3), _randn(11, 3))
    with pytest.raises(ValueError, match=r"\(10,\)"):
        linear_cka(_randn(10), _randn(10, 3))
    with pytest.raises(ValueError, match=r"at least 2 samples.*\(1, 3\)"):
        linear_cka(_randn(1, 3), _randn(1, 4))
    with pytest.raises(ValueError, match=r"same number of samples.*\(6, 2\)"):
        cka_matrix([_randn(5, 2), _randn(6, 2)], [_randn(5, 3)])
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        rbf_cka(_randn(5, 2), _randn(4, 2))
    with pytest.raises(ValueError, match="method"):
        cka_matrix([_randn(5, 2)], method="svd")


# ---------------------------------------------------------------- float32 products


def test_float32_products_agree_with_float64_on_offset_relu_maps() -> None:
    """The fast path centres before the float32 products, so a large activation mean costs no
    digits: on post-ReLU "maps" shifted by 1000 it must agree with the float64 route to 1e-6 on
    both routes and the minibatch estimator (build-then-centre in float32 is off by 0.47 here)."""
    base = torch.relu(_randn(48, 300, seed=200)).float()
    xs = [base[:, :200] + 1000.0, torch.relu(base @ _randn(300, 150, seed=201).float()) + 1000.0]
    ys = [base[:, 100:] * 2.0 + 1000.0, torch.relu(_randn(48, 64, seed=202)).float()]
    for method in ("feature", "gram"):
        exact = cka_matrix(xs, ys, method=method)
        fast = cka_matrix(xs, ys, method=method, matmul_dtype="float32")
        assert fast.dtype == torch.float64
        assert torch.allclose(fast, exact, atol=1e-6, rtol=0), method
    exact_mb, fast_mb = MinibatchCKA(), MinibatchCKA(matmul_dtype="float32")
    for sl in (slice(0, 24), slice(24, 48)):
        exact_mb.update([x[sl] for x in xs], [y[sl] for y in ys])
        fast_mb.update([x[sl] for x in xs], [y[sl] for y in ys])
    assert torch.allclose(fast_mb.compute(), exact_mb.compute(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="matmul_dtype.*float16"):
        cka_matrix(xs, matmul_dtype="float16")


def test_reference_features_match_pairwise_cka() -> None:
    from snnet.cka import ReferenceFeatures

    base = _randn(120, 6, seed=300)
    refs = [base @ _randn(6, 5, seed=301 + i) + (i + 1) * 0.5 * _randn(120, 5, seed=310 + i) + 100.0 for i in range(4)]
    query = torch.tanh(base @ _randn(6, 7, seed=320))
    prepared = ReferenceFeatures(refs)
    expected = torch.stack([linear_cka(r, query) for r in refs])
    assert len(prepared) == 4
    assert torch.allclose(prepared.cka(query), expected, atol=1e-12, rtol=0)
    assert len(set(expected.tolist())) == 4  # the sets differ, so a mix-up of rows would show
    fast = ReferenceFeatures([r.float() for r in refs], matmul_dtype="float32").cka(query.float())
    assert torch.allclose(fast, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="one shape"):
        ReferenceFeatures([refs[0], refs[1][:, :3]])
    with pytest.raises(ValueError, match="samples"):
        prepared.cka(query[:50])
