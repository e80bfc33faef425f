"""GN conditioning (hessian_nme_conditioning.md §4, facts 13-21) against dense float64 oracles."""

import copy
import math

import numpy as np
import pytest
import torch
from curvlinops import FisherType, GGNLinearOperator, KFACLinearOperator
from torch import nn
from torch.func import functional_call, jacrev

from gnrev_plugin.metrics import (
    condition_number_from_eigenvalues,
    deep_linear_condition_bounds,
    deep_linear_gn_rank,
    deep_linear_gn_spectrum,
    dense_matrix,
    empirical_ntk,
    gn_condition_number,
    gn_gram_matrix,
    residual_layer_condition_bound,
    residual_layer_condition_number,
    residual_weights,
    spectrum_lemma_matrix,
    two_layer_relu_gram,
    whitened_two_layer_condition_number,
)
from gnrev_plugin.metrics.conditioning import deep_linear_jacobian_factor, matrix_condition_number

DT = torch.float64


def deep_linear(widths, seed, residual_beta=None):
    """Bias-free linear net d=widths[0] → ... → k=widths[-1] (optional W + βI hidden layers)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    if residual_beta is None:
        return nn.Sequential(*layers).to(DT)
    return ResidualLinearNet(layers, residual_beta).to(DT)


class ResidualLinearNet(nn.Module):
    """F(x) = W_L (W_{L-1} + βI) ⋯ (W_2 + βI) W_1 x."""

    def __init__(self, layers, beta):
        super().__init__()
        self.layers, self.beta = nn.ModuleList(layers), beta

    def forward(self, x):
        x = self.layers[0](x)
        for lin in self.layers[1:-1]:
            x = lin(x) + self.beta * x
        return self.layers[-1](x)


def weights(model):
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]


def data_for(d, k, n, seed, whiten=False, anisotropic=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    if anisotropic:
        X = X * torch.logspace(0, 1.2, d, dtype=DT)
    if whiten:                       # exactly XᵀX/n = I (n ≥ d)
        q, _ = torch.linalg.qr(X)
        X = q * math.sqrt(n)
    Y = torch.randn(n, k, generator=g, dtype=DT)
    return X, Y


def ggn_sum_mse(model, X, Y):
    """Dense G for nn.MSELoss('sum') = 2 Σ J_nᵀ J_n = 2n · G_O (G_O of the 1/(2n) Σ‖·‖² loss)."""
    op = GGNLinearOperator(model, nn.MSELoss(reduction="sum"), list(model.parameters()),
                           [(X, Y)], check_deterministic=False)
    return dense_matrix(op)


def nonzero_desc(ev, rtol=1e-10):
    ev = ev.flip(0) if ev[0] < ev[-1] else ev
    return ev[ev > rtol * ev[0]]


# ------------------------------------------------------------------- fact 13
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_fact13_column_space_equivalence(loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (10,), generator=g) if loss == "ce" else torch.randn(10, 3, dtype=DT)
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    data = [(X[:5], y[:5]), (X[5:], y[5:])]
    G = dense_matrix(GGNLinearOperator(model, loss_fn, list(model.parameters()), data,
                                       check_deterministic=False))
    K = gn_gram_matrix(model, loss_fn, data)
    ev_g, ev_k = nonzero_desc(torch.linalg.eigvalsh(G)), nonzero_desc(torch.linalg.eigvalsh(K))
    assert ev_g.numel() == ev_k.numel()
    assert torch.allclose(ev_g, ev_k, rtol=1e-9, atol=1e-13)
    if loss == "ce":                 # softmax Hessian has a null vector: rank N(C−1)
        assert ev_k.numel() == 10 * 2
    # BackPACK's symmetric factor V (G = VᵀV) gives the same nonzero spectrum
    import backpack  # a required dependency
    from backpack.extensions import SqrtGGNExact

    ext, ext_loss = backpack.extend(copy.deepcopy(model)), backpack.extend(copy.deepcopy(loss_fn))
    V = []
    for Xb, yb in data:
        ext.zero_grad()
        with backpack.backpack(SqrtGGNExact()):
            ext_loss(ext(Xb), yb).backward()
        # mean reduction: each batch carries 1/N_B; reweight to the full-data G (N_B/N)
        V.append(torch.cat([p.sqrt_ggn_exact.flatten(0, 1).flatten(1) for p in ext.parameters()],
                           1) * math.sqrt(Xb.shape[0] / X.shape[0]))
    V = torch.cat(V)
    assert torch.allclose(V.T @ V, G, atol=1e-13)
    ev_v = nonzero_desc(torch.linalg.eigvalsh(V @ V.T))
    assert torch.allclose(ev_v, ev_g, rtol=1e-9, atol=1e-13)
    # gn_condition_number: both sides give the same κ and rank
    rp = gn_condition_number(model, loss_fn, data, side="parameter", rtol=1e-10)
    rg = gn_condition_number(model, loss_fn, data, side="gram", rtol=1e-10)
    assert rp.rank == rg.rank == ev_g.numel()
    assert rp.kappa == pytest.approx(rg.kappa, rel=1e-8)
    assert rp.kappa == pytest.approx((ev_g[0] / ev_g[-1]).item(), rel=1e-8)


def test_gram_side_on_revmlp_uses_structured_ntk():
    from gnrev_plugin.nn import RevMLP

    model = RevMLP(6, 8, 2, num_classes=3, seed=0, init_std=0.3, linear_first_block=False).to(DT)
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(5, 6, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    data = [(X, y)]
    rep = gn_condition_number(model, nn.CrossEntropyLoss(), data)       # P=112 > nC=15
    assert rep.side == "gram"
    rp = gn_condition_number(model, nn.CrossEntropyLoss(), data, side="parameter",
                             rtol=rep.rtol)
    assert rep.rank == rp.rank == 5 * 2
    assert rep.kappa == pytest.approx(rp.kappa, rel=1e-8)


def test_condition_report_sensitivity():
    ev = torch.tensor([10.0, 5.0, 1.0, 1e-3, 1e-14, 0.0], dtype=DT)
    rep = condition_number_from_eigenvalues(ev, rtol=1e-6, rank_window=2)
    assert rep.rank == 4 and rep.kappa == pytest.approx(1e4)
    assert rep.gap == pytest.approx(1e-3 / 1e-14)
    assert [r["rank"] for r in rep.rank_sensitivity] == [2, 3, 4, 5, 6]
    assert rep.rank_sensitivity[1]["kappa"] == pytest.approx(10.0)
    assert rep.rank_sensitivity[-1]["kappa"] == math.inf
    by_tol = {r["rtol"]: (r["rank"], r["kappa"]) for r in rep.rtol_sensitivity}
    assert by_tol[1e-2] == (3, pytest.approx(10.0))
    assert by_tol[1e-14] == (4, pytest.approx(1e4))      # 1e-14 < 1e-14 · λ_1
    d = rep.as_dict()
    assert d == dict(kappa=rep.kappa, rank=4, lambda_max=10.0, lambda_min_nonzero=1e-3, rtol=1e-6,
                     side="matrix", gap=rep.gap, rank_sensitivity=rep.rank_sensitivity,
                     rtol_sensitivity=rep.rtol_sensitivity)
    assert d["kappa"] == pytest.approx(1e4) and d["gap"] == pytest.approx(1e11)
    assert len(d["rank_sensitivity"]) == 5 and len(d["rtol_sensitivity"]) == 7
    with pytest.raises(ValueError):
        condition_number_from_eigenvalues(torch.zeros(3))


# ------------------------------------------------------------------- facts 14 and 15
CASES = [  # (d, hidden widths, k, n)
    (4, [6], 3, 12), (5, [3], 4, 12), (6, [8, 7], 3, 15), (4, [5, 2, 6], 4, 10), (6, [8], 4, 4),
    (5, [6, 6, 6], 6, 20),
]


@pytest.mark.parametrize("d,hidden,k,n", CASES)
@pytest.mark.parametrize("whiten", [False, True])
def test_fact14_15_spectrum_lemma_and_rank(d, hidden, k, n, whiten):
    model = deep_linear([d, *hidden, k], seed=d + k + n)
    X, Y = data_for(d, k, n, seed=n, whiten=whiten and n >= d, anisotropic=not whiten)
    G_O = ggn_sum_mse(model, X, Y) / (2 * n)
    Ws = weights(model)
    Sigma = X.T @ X / n
    # G_O = Uᵀ(Σ ⊗ I_k)U up to the parameter ordering (column- vs row-major vec): same spectrum
    U = deep_linear_jacobian_factor(Ws)
    ev_u = torch.linalg.eigvalsh(U.T @ torch.kron(Sigma, torch.eye(k, dtype=DT)) @ U)
    ev_g = torch.linalg.eigvalsh(G_O)
    assert torch.allclose(ev_u, ev_g, atol=1e-11 * ev_g[-1])
    r = int(torch.linalg.matrix_rank(Sigma))
    rank = deep_linear_gn_rank(hidden, k, r)
    assert int(torch.linalg.matrix_rank(G_O, rtol=1e-10)) == rank
    lemma = deep_linear_gn_spectrum(Ws, Sigma)
    assert torch.allclose(lemma[:rank], ev_g.flip(0)[:rank], rtol=1e-7, atol=1e-12 * ev_g[-1])
    assert lemma[rank:].abs().max() <= 1e-10 * ev_g[-1] if lemma.numel() > rank else True


def test_fact15_rank_formula_examples():
    assert deep_linear_gn_rank([2], k=4, r=5) == 2 * (5 + 4 - 2)          # bottleneck
    assert deep_linear_gn_rank([8], k=3, r=2) == 2 * (2 + 3 - 2)          # n < d: r = n
    assert deep_linear_gn_rank([9, 9], k=3, r=6) == 3 * 6                 # q = k: dk


# ------------------------------------------------------------------- fact 16
def test_fact16_linear_model():
    d, k, n = 5, 3, 20
    model = deep_linear([d, k], seed=1)
    X, Y = data_for(d, k, n, seed=2, anisotropic=True)
    G = ggn_sum_mse(model, X, Y)
    Sigma = X.T @ X / n
    # nn.Linear.weight.flatten() is row-major: G = 2n (I_k ⊗ Σ)
    assert torch.allclose(G, 2 * n * torch.kron(torch.eye(k, dtype=DT), Sigma), atol=1e-12)
    ev = torch.linalg.eigvalsh(Sigma)
    rep = gn_condition_number(model, nn.MSELoss(reduction="sum"), [(X, Y)])
    assert rep.rank == d * k
    assert rep.kappa == pytest.approx((ev[-1] / ev[0]).item(), rel=1e-10)


# ------------------------------------------------------------------- facts 17 and 18
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fact17_whitened_two_layer_closed_form(seed):
    d, m, k, n = 4, 7, 3, 16
    model = deep_linear([d, m, k], seed=seed)
    X, Y = data_for(d, k, n, seed=seed, whiten=True)
    assert torch.allclose(X.T @ X / n, torch.eye(d, dtype=DT), atol=1e-12)
    W1, W2 = weights(model)
    G_O = ggn_sum_mse(model, X, Y) / (2 * n)
    ev = nonzero_desc(torch.linalg.eigvalsh(G_O))
    s1, s2 = torch.linalg.svdvals(W1), torch.linalg.svdvals(W2)
    sums = (s1[:, None] ** 2 + s2[None, :] ** 2).flatten().sort(descending=True).values
    assert ev.numel() == d * k
    assert torch.allclose(ev, sums, rtol=1e-9)
    kappa = (ev[0] / ev[-1]).item()
    assert whitened_two_layer_condition_number(W1, W2) == pytest.approx(kappa, rel=1e-9)
    b = deep_linear_condition_bounds([W1, W2], torch.eye(d, dtype=DT))
    assert b["convex"] == pytest.approx(kappa, rel=1e-9)          # the bound is tight here
    assert sum(b["gammas"]) == pytest.approx(1.0)


@pytest.mark.parametrize("widths", [[8], [8, 7], [6, 6, 6], [9, 9]])
@pytest.mark.parametrize("whiten", [False, True])
def test_fact18_upper_bounds(widths, whiten):
    d, k, n = 5, 3, 24
    model = deep_linear([d, *widths, k], seed=len(widths) + 10 * whiten)
    X, Y = data_for(d, k, n, seed=3, whiten=whiten, anisotropic=not whiten)
    G_O = ggn_sum_mse(model, X, Y) / (2 * n)
    rep = gn_condition_number(model, nn.MSELoss(reduction="sum"), [(X, Y)], rtol=1e-10)
    assert rep.rank == d * k
    b = deep_linear_condition_bounds(weights(model), X.T @ X / n)
    assert rep.kappa <= b["convex"] * (1 + 1e-9)
    assert b["convex"] <= b["loose"] * (1 + 1e-12)
    ev = nonzero_desc(torch.linalg.eigvalsh(G_O))
    assert rep.kappa == pytest.approx((ev[0] / ev[-1]).item(), rel=1e-8)


# ------------------------------------------------------------------- fact 19
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_fact19_residual_layers(beta):
    d, m, k, n = 4, 5, 3, 12
    model = deep_linear([d, m, m, m, k], seed=4, residual_beta=beta)
    X, Y = data_for(d, k, n, seed=5, anisotropic=True)
    G_O = ggn_sum_mse(model, X, Y) / (2 * n)
    eff = residual_weights(weights(model), beta)
    with torch.no_grad():          # the effective product reproduces the network
        prod = X.T
        for W in eff:
            prod = W @ prod
        assert torch.allclose(prod.T, model(X), atol=1e-12)
    rank = deep_linear_gn_rank([m, m, m], k, d)
    ev = torch.linalg.eigvalsh(G_O).flip(0)
    lemma = deep_linear_gn_spectrum(eff, X.T @ X / n)
    assert torch.allclose(lemma[:rank], ev[:rank], rtol=1e-7)


def test_fact19_residual_layer_identities():
    g = torch.Generator().manual_seed(6)
    A = torch.randn(5, 5, generator=g, dtype=DT)
    W = A @ A.T / 5                                         # symmetric PSD: aligned SVD
    for beta in (0.1, 1.0, 3.0):
        kap = matrix_condition_number(W + beta * torch.eye(5, dtype=DT))
        assert residual_layer_condition_number(W, beta) == pytest.approx(kap, rel=1e-10)
        assert kap <= matrix_condition_number(W)
    B = torch.randn(5, 5, generator=g, dtype=DT)            # generic W, β > σ_max
    smax = torch.linalg.svdvals(B)[0].item()
    for beta in (1.1 * smax, 3 * smax):
        assert matrix_condition_number(B + beta * torch.eye(5, dtype=DT)) <= \
            residual_layer_condition_bound(B, beta) * (1 + 1e-12)
    with pytest.raises(ValueError):
        residual_layer_condition_bound(B, 0.5 * smax)


# ------------------------------------------------------------------- fact 20
@pytest.mark.parametrize("widths", [[4, 6, 3], [3, 5, 4, 2]])
def test_fact20_kfac_type2_exact_for_deep_linear_mse(widths):
    model = deep_linear(widths, seed=7)
    N = 9
    X, Y = data_for(widths[0], widths[-1], N, seed=8, anisotropic=True)
    loss_fn, params = nn.MSELoss(reduction="sum"), list(model.parameters())
    G = ggn_sum_mse(model, X, Y)
    K = dense_matrix(KFACLinearOperator(model, loss_fn, params, [(X, Y)],
                                        fisher_type=FisherType.TYPE2, check_deterministic=False))
    mask = torch.zeros_like(G, dtype=torch.bool)
    off = 0
    for p in params:
        mask[off:off + p.numel(), off:off + p.numel()] = True
        off += p.numel()
    assert (K - G * mask).abs().max() <= 1e-12 * G.abs().max()
    # tr(G) = 2N Σ_l tr(W_{<l} Σ W_{<l}ᵀ) ‖W_{>l}‖_F²
    from gnrev_plugin.metrics.conditioning import deep_linear_partial_products

    before, after = deep_linear_partial_products(weights(model))
    Sigma = X.T @ X / N
    rhs = 2 * N * sum((b @ Sigma @ b.T).trace() * a.pow(2).sum()
                      for b, a in zip(before, after, strict=True))
    assert G.trace().item() == pytest.approx(rhs.item(), rel=1e-12)


# ------------------------------------------------------------------- fact 21
@pytest.mark.parametrize("seed", [0, 1])
def test_fact21_two_layer_relu_gram(seed):
    d, m, k, n = 4, 6, 3, 7
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, m, bias=False), nn.ReLU(),
                          nn.Linear(m, k, bias=False)).to(DT)
    X = torch.randn(n, d, dtype=DT)
    K = empirical_ntk(model, X, method="func")
    V, W = weights(model)
    assert torch.allclose(two_layer_relu_gram(W, V, X), K, atol=1e-12)
    # with all units active the second term is the linear-network one
    Xp, Vp = X.abs(), V.abs()
    lin = two_layer_relu_gram(W, Vp, Xp)
    expect = torch.kron(Xp @ Vp.T @ Vp @ Xp.T, torch.eye(k, dtype=DT)) + \
        torch.kron(Xp @ Xp.T, W @ W.T)
    assert torch.allclose(lin, expect, atol=1e-12)


def test_spectrum_lemma_matrix_is_uut():
    Ws = [torch.randn(5, 4, dtype=DT), torch.randn(3, 5, dtype=DT)]
    U = deep_linear_jacobian_factor(Ws)
    assert torch.allclose(spectrum_lemma_matrix(Ws), U @ U.T, atol=1e-12)


# ------------------------------------------------------------------- fact 18, exact values
EPS = np.finfo(np.float64).eps


def np_zhao_bounds(Ws, X):
    """Zhao et al.'s bounds from NumPy singular values of hand-multiplied partial products:
    ``γ_l = min2_l / Σ min2``, convex ``κ(Σ) Σ max2 / Σ min2``, loose
    ``κ(Σ) max_l κ²(W_{<l}) κ²(W_{>l})`` with ``σ_min(W_{<l}) := σ_d``, ``σ_min(W_{>l}) := σ_k``,
    taken as 0 when missing or below ``max(shape)·eps·σ_max`` (``matrix_rank``'s rule: a bottleneck
    makes the product exactly rank-deficient, its σ_d is rounding noise)."""
    Ws = [w.numpy() for w in Ws]
    d, k = Ws[0].shape[1], Ws[-1].shape[0]
    Xn = X.numpy()
    ev = np.linalg.eigvalsh(Xn.T @ Xn / len(Xn))
    kappa_sigma = ev[-1] / ev[0]
    max2, min2 = [], []
    for l in range(len(Ws)):
        before = np.eye(d)
        for w in Ws[:l]:
            before = w @ before
        after = np.eye(k)                     # W_{>l} = W_L ⋯ W_{l+1}
        for w in reversed(Ws[l + 1:]):
            after = after @ w
        sb, sa = np.linalg.svd(before, compute_uv=False), np.linalg.svd(after, compute_uv=False)
        lo_b = sb[d - 1] if len(sb) >= d and sb[d - 1] > max(before.shape) * EPS * sb[0] else 0.0
        lo_a = sa[k - 1] if len(sa) >= k and sa[k - 1] > max(after.shape) * EPS * sa[0] else 0.0
        max2.append((sb[0] * sa[0]) ** 2)
        min2.append((lo_b * lo_a) ** 2)
    max2, min2 = np.array(max2), np.array(min2)
    den = min2.sum()
    gammas = min2 / den if den > 0 else np.full(len(min2), np.nan)
    loose = kappa_sigma * max(m / q if q > 0 else np.inf for m, q in zip(max2, min2, strict=True))
    return dict(kappa_sigma=kappa_sigma, gammas=gammas, loose=loose, max2=max2, min2=min2,
                convex=kappa_sigma * max2.sum() / den if den > 0 else np.inf)


@pytest.mark.parametrize("widths", [[8], [8, 7], [6, 6, 6], [9, 9], [3], [7, 2]])
def test_fact18_bound_values_on_non_whitened_data(widths):
    """The exact values of γ_l and both bounds (1e-10 relative), on anisotropic data where
    κ(Σ) ≫ 1 matters; bottlenecks (width < d) make σ_d(W_{<l}) = 0 and the loose bound infinite."""
    d, k, n = 5, 3, 24
    model = deep_linear([d, *widths, k], seed=20 + len(widths) + sum(widths))
    X, _ = data_for(d, k, n, seed=4, anisotropic=True)
    Ws = weights(model)
    want = np_zhao_bounds(Ws, X)
    assert want["kappa_sigma"] > 10                          # non-whitened: κ(Σ) matters
    got = deep_linear_condition_bounds(Ws, X.T @ X / n)
    assert got["kappa_sigma"] == pytest.approx(want["kappa_sigma"], rel=1e-10)
    np.testing.assert_allclose(got["gammas"], want["gammas"], rtol=1e-10, atol=1e-15)
    assert got["convex"] == pytest.approx(want["convex"], rel=1e-10)   # also inf == inf
    np.testing.assert_allclose([t["max2"] for t in got["terms"]], want["max2"], rtol=1e-10)
    np.testing.assert_allclose([t["min2"] for t in got["terms"]], want["min2"], rtol=1e-10,
                               atol=1e-300)
    if min(widths) < d:             # bottleneck: W_{<l} loses rank d after it
        assert math.isinf(got["loose"]) and math.isinf(want["loose"])
        assert want["min2"][1:].max() == 0.0
    else:
        assert got["loose"] == pytest.approx(want["loose"], rel=1e-10)
        assert got["convex"] < got["loose"]                  # strictly: the terms differ
    if want["min2"].min() > 0:      # the convex combination Σ γ_l κ²κ² equals Σ max2 / Σ min2
        combo = (want["gammas"] * want["max2"] / want["min2"]).sum()
        assert got["convex"] == pytest.approx(want["kappa_sigma"] * combo, rel=1e-10)
    if math.isfinite(got["convex"]):   # and κ(G) ≤ convex bound on these data (dense G)
        rep = gn_condition_number(model, nn.MSELoss(reduction="sum"),
                                  [(X, torch.zeros(n, k, dtype=DT))], rtol=1e-10)
        assert rep.kappa <= got["convex"] * (1 + 1e-9)


def test_fact18_bounds_without_sigma_and_with_singular_sigma():
    Ws = weights(deep_linear([4, 6, 3], seed=31))
    X, _ = data_for(4, 3, 10, seed=31)
    base = deep_linear_condition_bounds(Ws)
    assert base["kappa_sigma"] == 1.0
    scaled = np_zhao_bounds(Ws, X)
    assert base["convex"] == pytest.approx(scaled["convex"] / scaled["kappa_sigma"], rel=1e-10)
    singular = deep_linear_condition_bounds(Ws, torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.0],
                                                                         dtype=DT)))
    assert math.isinf(singular["kappa_sigma"]) and math.isinf(singular["convex"])


def test_matrix_condition_number_index_and_singular_cases():
    A = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=DT))
    assert matrix_condition_number(A) == pytest.approx(4.0, rel=1e-14)
    assert matrix_condition_number(A, sigma_min_index=2) == pytest.approx(2.0, rel=1e-14)
    assert matrix_condition_number(A, sigma_min_index=1) == pytest.approx(1.0, rel=1e-14)
    assert math.isinf(matrix_condition_number(A, sigma_min_index=4))       # fewer than 4 σ
    S = torch.diag(torch.tensor([2.0, 0.0], dtype=DT))                   # exactly singular
    assert math.isinf(matrix_condition_number(S))
    assert matrix_condition_number(S, sigma_min_index=1) == 1.0


def test_residual_layer_bound_value_and_assumption():
    g = torch.Generator().manual_seed(9)
    B = torch.randn(4, 4, generator=g, dtype=DT)
    s = np.linalg.svd(B.numpy(), compute_uv=False)
    beta = 1.5 * s[0]
    assert residual_layer_condition_bound(B, beta) == pytest.approx(
        (beta + s[0]) / (beta - s[0]), rel=1e-12)
    with pytest.raises(ValueError, match="needs β > σ_max"):
        residual_layer_condition_bound(B, float(torch.linalg.svdvals(B)[0]))   # β = σ_max


def test_fact21_relu_derivative_at_zero_preactivation():
    """A unit whose pre-activation is exactly 0 has D = 0 (torch's relu'(0) = 0), as in the
    dense NTK: a zero row of V."""
    d, m, k, n = 3, 4, 2, 5
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(d, m, bias=False), nn.ReLU(),
                          nn.Linear(m, k, bias=False)).to(DT)
    with torch.no_grad():
        model[0].weight[1] = 0.0
    X = torch.randn(n, d, dtype=DT)
    V, W = weights(model)
    K = empirical_ntk(model, X, method="func")
    assert torch.allclose(two_layer_relu_gram(W, V, X), K, rtol=0, atol=1e-12)


def test_whitened_two_layer_closed_form_with_a_bottleneck_is_infinite():
    """m < d and k > m: σ_d(W₁) and σ_k(W₂) do not exist (0), the closed form is ∞."""
    g = torch.Generator().manual_seed(10)
    W1, W2 = torch.randn(2, 4, generator=g, dtype=DT), torch.randn(3, 2, generator=g, dtype=DT)
    assert math.isinf(whitened_two_layer_condition_number(W1, W2))


class CoupledSumLoss(nn.Module):
    """``(Σ_{n,c} (z − y))²``: its Hessian 2·11ᵀ couples the samples (not per-sample separable)."""

    reduction = "sum"

    def forward(self, z, y):
        return (z - y).sum() ** 2


def test_gn_gram_with_a_loss_that_couples_samples():
    """Nonzero spectrum of ``S K S`` = that of ``Jᵀ H_z J`` with dense jacrev/hessian (1e-9)."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X, Y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    names = [n for n, _ in model.named_parameters()]
    ps = tuple(p.detach() for p in model.parameters())
    jac = jacrev(lambda *q: functional_call(model, dict(zip(names, q, strict=True)), (X,))
                 .reshape(-1), argnums=tuple(range(len(ps))))(*ps)
    J = torch.cat([j.reshape(10, -1) for j in jac], 1)
    Hz = torch.func.hessian(lambda z: CoupledSumLoss()(z.reshape(5, 2), Y))(
        model(X).detach().reshape(-1))
    assert (Hz - 2 * torch.ones(10, 10, dtype=DT)).abs().max() < 1e-12
    want = nonzero_desc(torch.linalg.eigvalsh(J.T @ Hz @ J), rtol=1e-9)
    got = nonzero_desc(torch.linalg.eigvalsh(gn_gram_matrix(model, CoupledSumLoss(), [(X, Y)])),
                       rtol=1e-9)
    assert want.numel() == got.numel() == 1
    assert torch.allclose(got, want, rtol=1e-9, atol=0)


def test_deep_linear_bounds_rounding_level_sigma_and_indefinite_sigma():
    """σ_k(W_{>1}) = 1e-12 next to σ_1 = 1e6 is below max(shape)·eps·σ_1: counted as 0, so the
    loose bound is ∞; a Σ whose smallest eigenvalue is a rounding-level negative is singular."""
    W1 = torch.eye(3, dtype=DT)
    W2 = torch.diag(torch.tensor([1e6, 1.0, 1e-12], dtype=DT))
    b = deep_linear_condition_bounds([W1, W2])
    assert b["terms"][0]["min2"] == 0.0 and math.isinf(b["loose"])
    Sigma = torch.diag(torch.tensor([1.0, 2.0, -1e-18], dtype=DT))
    assert math.isinf(deep_linear_condition_bounds([W1, W2], Sigma)["kappa_sigma"])
    with pytest.raises(ValueError, match="^need at least one weight matrix$"):
        deep_linear_condition_bounds([])


def test_condition_report_default_window_and_side_selection():
    ev = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.0], dtype=DT)
    rep = condition_number_from_eigenvalues(ev)                  # default rank_window = 3
    assert rep.rank == 8 and [r["rank"] for r in rep.rank_sensitivity] == [5, 6, 7, 8, 9]
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).to(DT)    # P = 12
    X, Y = torch.randn(8, 2, dtype=DT), torch.randn(8, 2, dtype=DT)             # nC = 16
    assert gn_condition_number(model, nn.MSELoss(), [(X, Y)]).side == "parameter"   # P ≤ nC
    sub = [model[0].weight]
    rep = gn_condition_number(model, nn.MSELoss(), [(X[:2], Y[:2])], params=sub)
    assert rep.side == "parameter" and rep.rank <= 4
    with pytest.raises(ValueError, match="^side must be 'auto', 'parameter' or 'gram'$"):
        gn_condition_number(model, nn.MSELoss(), [(X, Y)], side="both")
