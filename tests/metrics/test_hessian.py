"""Hessian = GN + NME (hessian_nme_conditioning.md §4, facts 1-7, 11, 12), float64 dense oracles."""

import copy
import math

import pytest
import torch
from curvlinops import GGNLinearOperator, HessianLinearOperator, hutchinson_trace
from torch import nn
from torch.func import functional_call, hessian

from gnrev_plugin.metrics import decompose, dense_matrix, nme_surrogate_dense
from gnrev_plugin.metrics.hessian import estimate_trace
from gnrev_plugin.nn.dauphin_activations import (
    AblatedGELU,
    AblatedTanh,
    BetaGELU,
    NMEAblatedActivation,
    SyntheticNMEReLU,
    active_second_derivative_fraction,
    beta_gelu,
    beta_gelu_derivative,
    beta_gelu_second_derivative,
)

DT = torch.float64
ACTS = {"linear": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def mlp(act: str, seed: int, widths=(4, 5, 5, 3), bias=True) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(ACTS[act]())
    return nn.Sequential(*layers).to(DT)


def make_data(seed: int, loss: str, n=16, d=4, C=3, num_batches=2):
    g = torch.Generator().manual_seed(1000 + seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = (torch.randint(0, C, (n,), generator=g) if loss == "ce"
         else torch.randn(n, C, generator=g, dtype=DT))
    return list(zip(X.chunk(num_batches), y.chunk(num_batches), strict=True))


def loss_of(name):
    return nn.CrossEntropyLoss() if name == "ce" else nn.MSELoss()


def full_hessian_oracle(model, loss_fn, data):
    """torch.func.hessian of the full-data loss (independent of curvlinops)."""
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def L(v):
        ps = {n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes, strict=True)}
        return loss_fn(functional_call(model, ps, (X,)), y)

    return hessian(L)(flat)


def block_index(model):
    """Flat index ranges of each nn.Linear (weight + bias) = one layer block."""
    out, off = [], 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            size = sum(p.numel() for p in m.parameters())
            out.append(range(off, off + size))
            off += size
    return out


# ------------------------------------------------------------------- fact 1 and 2
@pytest.mark.parametrize("act", ["linear", "relu", "gelu", "tanh"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_fact1_h_equals_g_plus_surrogate_nme(act, loss):
    model, data, loss_fn = mlp(act, seed=0), make_data(0, loss), loss_of(loss)
    dec = decompose(model, loss_fn, data)
    H, G = dec.dense("hessian"), dec.dense("ggn")
    nme = nme_surrogate_dense(model, loss_fn, data)
    # curvlinops' H agrees with the independent full-data torch.func Hessian
    assert (H - full_hessian_oracle(model, loss_fn, data)).abs().max() <= 1e-12
    assert (H - (G + nme)).abs().max() <= 1e-12
    # the surrogate operator (one double-backward per product) is the same matrix
    assert (dec.dense("nme_surrogate") - dec.dense("nme")).abs().max() <= 1e-12
    # fact 2: G is PSD; in the nonlinear cases the NME has both signs
    ev_g = torch.linalg.eigvalsh(G)
    assert ev_g[0] >= -1e-12 * ev_g[-1]
    ev_n = torch.linalg.eigvalsh(nme)
    if act != "linear":
        assert ev_n[0] < -1e-6 and ev_n[-1] > 1e-6


def test_summary_exact_mode_consistent():
    model, data, loss_fn = mlp("gelu", seed=3), make_data(3, "mse"), nn.MSELoss()
    dec = decompose(model, loss_fn, data)
    s = dec.summary(top_k=4)
    H, G, N = dec.dense("hessian"), dec.dense("ggn"), dec.dense("nme")
    assert s.mode == "exact" and s.num_params == H.shape[0]
    for key, M in (("hessian", H), ("ggn", G), ("nme", N)):
        assert math.isclose(s.trace[key].value, M.trace().item(), rel_tol=1e-12)
        ev = torch.linalg.eigvalsh(M).flip(0)[:4]
        assert torch.allclose(torch.tensor(s.top_eigenvalues[key], dtype=DT), ev, atol=1e-12)
        assert math.isclose(s.frobenius[key], M.norm().item(), rel_tol=1e-12)
    assert math.isclose(s.lambda_min_hessian, torch.linalg.eigvalsh(H)[0].item(),
                        rel_tol=1e-10)
    assert math.isclose(s.ratios.nme_fro_over_hessian_fro, (N.norm() / H.norm()).item(),
                        rel_tol=1e-12)
    # per-block shares: blocks are the three nn.Linear layers; shares of tr(G) sum to 1
    assert set(s.blocks) == {"0", "2", "4"}
    assert math.isclose(sum(b.share_trace_ggn for b in s.blocks.values()), 1.0,
                        rel_tol=1e-12)
    within = sum(N[list(r)][:, list(r)].pow(2).sum().item() for r in block_index(model))
    assert math.isclose(s.nme_split.within_fro2, within, rel_tol=1e-12)
    assert math.isclose(s.nme_split.within_fro2 + s.nme_split.cross_fro2,
                        N.pow(2).sum().item(), rel_tol=1e-12)
    assert s.surrogate_check.max_abs_diff <= 1e-12


def test_summary_estimated_mode_matches_exact_eigs():
    """Lanczos (eigsh on to_scipy) reproduces the dense extreme eigenvalues; traces are
    estimated with the recorded estimator and matvec count."""
    model = mlp("tanh", seed=4, widths=(3, 4, 3))
    data, loss_fn = make_data(4, "ce", n=8, d=3), nn.CrossEntropyLoss()
    dec = decompose(model, loss_fn, data)
    s = dec.summary(top_k=3, exact_max_dim=0, num_matvecs=12, per_block=False,
                    trace_estimator="hutchpp")
    assert s.mode == "estimated"
    for key in ("hessian", "ggn", "nme"):
        ev = torch.linalg.eigvalsh(dec.dense(key)).flip(0)[:3]
        assert torch.allclose(torch.tensor(s.top_eigenvalues[key], dtype=DT), ev, atol=1e-8)
        assert s.trace[key].estimator == "hutchpp"
        assert s.trace[key].num_matvecs == 12 * (2 if key == "nme" else 1)
        assert s.eigs_info[key].num_matvecs > 0
    assert math.isclose(s.lambda_min_hessian,
                        torch.linalg.eigvalsh(dec.dense("hessian"))[0].item(), abs_tol=1e-8)


# ------------------------------------------------------------------- facts 3 and 4
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_fact3_linear_model_nme_is_zero(loss):
    torch.manual_seed(1)
    model = nn.Linear(4, 3).to(DT)
    dec = decompose(model, loss_of(loss), make_data(1, loss))
    assert (dec.dense("hessian") - dec.dense("ggn")).abs().max() <= 1e-15
    assert dec.dense("nme_surrogate").abs().max() <= 1e-15


def test_fact4_mse_at_interpolation_nme_is_zero():
    model = mlp("tanh", seed=2)
    data = make_data(2, "mse")
    with torch.no_grad():
        data = [(X, model(X)) for X, _ in data]          # targets = outputs
    dec = decompose(model, nn.MSELoss(), data)
    assert dec.dense("nme").abs().max() <= 1e-15
    assert dec.dense("nme_surrogate").abs().max() <= 1e-15


# ------------------------------------------------------------------- facts 5 and 6
@pytest.mark.parametrize("act,loss", [("linear", "mse"), ("relu", "mse"), ("relu", "ce")])
def test_fact5_6_within_layer_nme_vanishes(act, loss):
    model = mlp(act, seed=5, bias=(act == "relu"))
    dec = decompose(model, loss_of(loss), make_data(5, loss))
    N = dec.dense("nme")
    for r in block_index(model):
        idx = list(r)
        assert N[idx][:, idx].abs().max() == 0.0
    assert N.diagonal().abs().max() == 0.0
    assert N.trace() == 0.0
    assert N.abs().max() > 1e-6                            # cross-layer blocks survive
    s = dec.summary(per_block=True)
    assert s.trace["hessian"].value == pytest.approx(s.trace["ggn"].value, abs=1e-14)
    assert s.nme_split.within_fro2 == 0.0


def _backpack_diag_gap(act_cls, seed=6):
    import backpack  # a required dependency
    from backpack.extensions import DiagGGNExact, DiagHessian

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), act_cls(), nn.Linear(5, 3)).to(DT)
    X, y = make_data(seed, "ce", num_batches=1)[0]
    ext_model = backpack.extend(copy.deepcopy(model))
    ext_loss = backpack.extend(nn.CrossEntropyLoss())
    with backpack.backpack(DiagHessian(), DiagGGNExact()):
        ext_loss(ext_model(X), y).backward()
    dh = torch.cat([p.diag_h.reshape(-1) for p in ext_model.parameters()])
    dg = torch.cat([p.diag_ggn_exact.reshape(-1) for p in ext_model.parameters()])
    # the un-extended original agrees with curvlinops' dense Hessian diagonal
    H = dense_matrix(HessianLinearOperator(model, nn.CrossEntropyLoss(),
                                           list(model.parameters()), [(X, y)]))
    assert (H.diagonal() - dh).abs().max() <= 1e-14
    return (dh - dg).abs().max().item()


def test_fact6_backpack_diag_hessian_equals_diag_ggn_for_relu():
    assert _backpack_diag_gap(nn.ReLU) == 0.0


@pytest.mark.parametrize("act_cls", [nn.Sigmoid, nn.Tanh, nn.ELU])
def test_fact6_backpack_diag_differs_for_smooth_activations(act_cls):
    assert _backpack_diag_gap(act_cls) > 1e-5


# ------------------------------------------------------------------- fact 7
@pytest.mark.parametrize("act,ablated", [("gelu", AblatedGELU), ("tanh", AblatedTanh)])
def test_fact7_smooth_nme_diag_nonzero_and_ablation(act, ablated):
    model = mlp(act, seed=7)
    data, loss_fn = make_data(7, "mse"), nn.MSELoss()
    dec = decompose(model, loss_fn, data)
    assert dec.dense("nme").diagonal().abs().max() > 1e-3
    abl = copy.deepcopy(model)
    for i, m in enumerate(abl):
        if isinstance(m, ACTS[act]):
            abl[i] = ablated()
    dec_abl = decompose(abl, loss_fn, data)
    with torch.no_grad():
        assert torch.equal(abl(data[0][0]), model(data[0][0]))
    G, G_abl = dec.dense("ggn"), dec_abl.dense("ggn")
    assert (G_abl - G).abs().max() <= 1e-14
    assert (dec_abl.dense("hessian").diagonal() - G.diagonal()).abs().max() <= 1e-14
    # the cross-layer NME (first derivatives only) is kept
    assert dec_abl.dense("nme").abs().max() > 1e-6


def test_synthetic_nme_relu_has_relu_values_and_curvature():
    act = SyntheticNMEReLU(beta=4.0)
    x = torch.linspace(-3, 3, 61, dtype=DT, requires_grad=True)
    y = act(x)
    assert torch.equal(y.detach(), torch.relu(x.detach()))
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert torch.equal(g.detach(), (x.detach() > 0).to(DT))
    (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.allclose(h, beta_gelu_second_derivative(x.detach(), 4.0), atol=1e-14)


def test_generic_ablated_activation_keeps_first_derivative():
    act = NMEAblatedActivation(torch.sin, torch.cos)
    x = torch.linspace(-2, 2, 9, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
    assert torch.allclose(g, torch.cos(x.detach()), atol=1e-15)
    g2 = torch.autograd.grad(g.sum(), x, allow_unused=True)[0] if g.requires_grad else None
    assert g2 is None or g2.abs().max() == 0                # φ'' dropped from double-backward


# ------------------------------------------------------------------- fact 11
def test_fact11_beta_gelu():
    x = torch.linspace(-6, 6, 2001, dtype=DT)
    assert torch.allclose(beta_gelu(x, 1.0), torch.nn.functional.gelu(x), atol=1e-15)
    assert torch.allclose(BetaGELU(1.0)(x), nn.GELU()(x), atol=1e-15)
    for beta in (0.5, 1.0, 4.0, 16.0):
        xr = x.clone().requires_grad_(True)
        (d1,) = torch.autograd.grad(beta_gelu(xr, beta).sum(), xr, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), xr)
        assert torch.allclose(d1.detach(), beta_gelu_derivative(x, beta), atol=1e-13)
        assert (d2 - beta_gelu_second_derivative(x, beta)).abs().max() <= 1e-13 * max(1, beta)
        # ∫ φ_β'' dx = 1 on a wide grid
        grid = torch.linspace(-40 / beta, 40 / beta, 200001, dtype=DT)
        assert torch.trapezoid(beta_gelu_second_derivative(grid, beta), grid).item() == \
            pytest.approx(1.0, abs=1e-8)
    fr = [active_second_derivative_fraction(x, b) for b in (1, 4, 16, 64)]
    assert all(a > b for a, b in zip(fr[:-1], fr[1:], strict=True))
    # spec §B1 values (fraction of |φ''| > 1e-3 on [-6, 6]): 0.70, 0.19, 0.051, 0.014
    assert fr == pytest.approx([0.70, 0.19, 0.051, 0.014], abs=0.01)


# ------------------------------------------------------------------- fact 12
def test_fact12_hutchinson_mean_within_three_standard_errors():
    model, data, loss_fn = mlp("gelu", seed=8, widths=(3, 4, 2)), make_data(8, "mse", d=3, C=2), \
        nn.MSELoss()
    params = list(model.parameters())
    H = HessianLinearOperator(model, loss_fn, params, data, check_deterministic=False)
    G = GGNLinearOperator(model, loss_fn, params, data, check_deterministic=False)
    for op in (H, G):
        exact = dense_matrix(op).trace().item()
        est = torch.tensor([estimate_trace(op, "hutchinson", 4, seed=s)[0] for s in range(40)])
        se = est.std().item() / math.sqrt(len(est))
        assert se > 0
        assert abs(est.mean().item() - exact) <= 3 * se
    # sanity of the wrapper: it is curvlinops' estimator with the recorded matvec count
    torch.manual_seed(123)
    ref = hutchinson_trace(H, 4).item()
    val, nmv = estimate_trace(H, "hutchinson", 4, seed=123)
    assert val == pytest.approx(ref, rel=1e-12) and nmv == 4


def test_summaries_leave_the_global_rng_alone_and_repeat_per_seed():
    """No global reseeding: estimate_trace and both summary modes draw from their own seed in a
    forked RNG state, so the caller's stream is unchanged and equal seeds give equal numbers."""
    model, data, loss_fn = mlp("gelu", seed=11, widths=(3, 4, 2)), \
        make_data(11, "mse", n=6, d=3, C=2), nn.MSELoss()
    dec = decompose(model, loss_fn, data)
    kw = dict(top_k=1, num_matvecs=6, block_num_matvecs=2, spectral_density=True,
              density_ncv=8)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    est = dec.summary(exact_max_dim=0, seed=3, **kw)
    exact = dec.summary(seed=3, **kw)
    val, _ = estimate_trace(dec.ggn, "hutchinson", 4, seed=5)
    assert torch.equal(torch.rand(3), expected)
    assert (est.mode, exact.mode) == ("estimated", "exact")
    again = dec.estimated_summary(seed=3, **kw)
    for field in ("trace", "frobenius", "blocks", "nme_split", "surrogate_check"):
        assert getattr(again, field) == getattr(est, field), field
    # (its bounds come from ARPACK, whose start vector is ARPACK's own: equal to rounding)
    assert again.spectral_density["nme"][1] == pytest.approx(est.spectral_density["nme"][1],
                                                             rel=1e-9, abs=1e-12)
    assert dec.exact_summary(seed=3, **{k: v for k, v in kw.items()
                                        if k in ("top_k", "spectral_density", "density_ncv")}
                             ).to_dict() == exact.to_dict()
    assert estimate_trace(dec.ggn, "hutchinson", 4, seed=5)[0] == val


def test_decompose_rejects_backpack_extended_model():
    import backpack  # a required dependency
    model = backpack.extend(mlp("relu", seed=0))
    with pytest.raises(ValueError, match="BackPACK"):
        decompose(model, nn.MSELoss(), make_data(0, "mse"))


def test_decompose_rejects_bad_loss():
    with pytest.raises(ValueError, match="reduction"):
        decompose(mlp("relu", 0), nn.MSELoss(reduction="none"), make_data(0, "mse"))


def test_summary_surrogate_nme_and_spectral_density():
    model = mlp("gelu", seed=9, widths=(2, 3, 2))
    data, loss_fn = make_data(9, "mse", n=6, d=2, C=2), nn.MSELoss()
    dec = decompose(model, loss_fn, data)
    s = dec.summary(top_k=1, exact_max_dim=0, num_matvecs=6, per_block=False, lambda_min=False,
                    frobenius=False, nme_operator="surrogate", spectral_density=True,
                    density_ncv=16)
    ev = torch.linalg.eigvalsh(dec.dense("nme"))
    assert s.top_eigenvalues["nme"][0] == pytest.approx(ev[-1].item(), abs=1e-8)
    assert s.trace["nme"].num_matvecs == 6 and math.isnan(s.frobenius["nme"])
    for key in ("hessian", "ggn", "nme"):
        grid, dens = (torch.tensor(v, dtype=DT) for v in s.spectral_density[key])
        assert torch.trapezoid(dens, grid).item() == pytest.approx(1.0, abs=0.05)
        e = torch.linalg.eigvalsh(dec.dense(key))
        assert grid[0] <= e[0] + 1e-8 and grid[-1] >= e[-1] - 1e-8


def test_decompose_on_revmlp_blocks_are_half_layers():
    from gnrev_plugin.nn import RevMLP

    model = RevMLP(4, 5, 2, num_classes=3, activation="gelu", linear_first_block=False,
                   init_std=0.3, seed=0).to(DT)
    data = make_data(10, "ce", n=6, d=4, C=3)
    dec = decompose(model, nn.CrossEntropyLoss(), data)
    assert list(dec.blocks) == ["blocks.0.f", "blocks.0.g", "blocks.1.f", "blocks.1.g"]
    nme = nme_surrogate_dense(model, nn.CrossEntropyLoss(), data)
    assert (dec.dense("hessian") - dec.dense("ggn") - nme).abs().max() <= 1e-12
    s = dec.summary(top_k=2)
    assert sum(b.num_params for b in s.blocks.values()) == dec.num_params
    # the last half-layer is linear in its own parameters (nothing follows it but U): no
    # within-block NME; earlier half-layers feed later GELUs, so theirs is nonzero
    assert s.blocks["blocks.1.g"].nme_within_fro == 0.0
    assert s.blocks["blocks.0.f"].nme_within_fro > 1e-6


def test_metrics_do_not_import_the_optimizer():
    import subprocess
    import sys

    code = ("import sys, gnrev_plugin.metrics; "
            "print(any(m.startswith('gnrev_plugin.optim') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_nme_surrogate_dense_of_a_parameter_subset():
    """The NME w.r.t. a parameter subset is that subset's block of the full NME, with the full
    NME from the independent torch.func Hessian minus curvlinops' dense GGN (1e-12)."""
    model, data, loss_fn = mlp("tanh", seed=3), make_data(3, "ce"), loss_of("ce")
    params = list(model.parameters())
    G = dense_matrix(GGNLinearOperator(model, loss_fn, params, data, check_deterministic=False))
    full = full_hessian_oracle(model, loss_fn, data) - G
    sub = [model[2].weight, model[0].bias]                  # not in parameters() order
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    got = nme_surrogate_dense(model, loss_fn, data, params=sub)
    order = [next(i for i, p in enumerate(params) if p is q) for q in sub]
    idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in order])
    assert got.shape == (idx.numel(), idx.numel())
    assert (got - full[idx][:, idx]).abs().max() <= 1e-12
    assert full[idx][:, idx].abs().max() > 1e-4


def test_nme_surrogate_dense_with_sum_reduction_over_batches():
    """``reduction='sum'`` weights each batch by 1 (mean: N_B/N): two batches against the
    torch.func Hessian of the full-data summed loss minus curvlinops' dense GGN (1e-11)."""
    model, data = mlp("gelu", seed=4), make_data(4, "mse")
    loss_fn = nn.MSELoss(reduction="sum")
    G = dense_matrix(GGNLinearOperator(model, loss_fn, list(model.parameters()), data,
                                       check_deterministic=False))
    want = full_hessian_oracle(model, loss_fn, data) - G
    got = nme_surrogate_dense(model, loss_fn, data)
    assert want.abs().max() > 1e-3
    assert (got - want).abs().max() <= 1e-11 * want.abs().max()
