"""BackPACK on RevMLP and on coupling blocks: every quantity against a dense float64 oracle.

Oracles: curvlinops' GGN/Hessian operators on an *un-extended* copy of the model, dense
``torch.func`` Jacobians (``J``, rows sample-major), loss Hessians ``∇²_F L`` and per-sample
gradients (``vmap(grad)``). Monte-Carlo extensions (DiagGGNMC, SqrtGGNMC, KFAC) are checked by
replaying the RNG: the loss's sampled square root ``S`` is redrawn with the same seed by BackPACK's
own loss derivatives, and the reference is the dense ``Σ (Jᵀ S)²`` / ``Σ J_bᵀ S Sᵀ J_b``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from backpack import backpack, extend
from backpack.context import CTX
from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from backpack.core.derivatives.mseloss import MSELossDerivatives
from backpack.extensions import (
    HMP,
    KFAC,
    KFLR,
    KFRA,
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SqrtGGNExact,
    SqrtGGNMC,
    SumGradSquared,
    Variance,
)
from backpack.extensions.module_extension import ModuleExtension
from curvlinops import GGNLinearOperator, HessianLinearOperator
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from gnrev_plugin.compat import backpack as compat_backpack
from gnrev_plugin.hosts import backpack as bp_host
from gnrev_plugin.hosts.backpack import SUPPORTED_EXTENSIONS, all_extensions, register
from gnrev_plugin.hosts.curvlinops import to_dense
from gnrev_plugin.nn import AdditiveCoupling, RevMLP

TOL = 1e-10
F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def problem(seed: int, activation: str = "tanh", loss: str = "ce", n: int = 5):
    torch.manual_seed(seed)
    model = RevMLP(6, 7, 2, 3, activation=activation, linear_first_block=False, init_std=0.5,
                   seed=seed).double()
    X = torch.randn(n, 6, dtype=F64)
    if loss == "ce":
        return model, X, torch.randint(0, 3, (n,)), nn.CrossEntropyLoss()
    return model, X, torch.randn(n, 3, dtype=F64), nn.MSELoss()


def run_backpack(model, lossf, X, y, *exts):
    """Extend deep copies (never the oracle's model) and run one backward pass."""
    mb, lb = extend(copy.deepcopy(model)), extend(copy.deepcopy(lossf))
    with backpack(*register(*exts)):
        lb(mb(X), y).backward()
    return mb


def flat(mb, attr: str, batch_dims: int = 0) -> torch.Tensor:
    return torch.cat([getattr(p, attr).flatten(batch_dims) for p in mb.parameters()], -1)


def functional(model):
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    return (lambda ps, x: functional_call(model, dict(zip(names, ps, strict=True)), (x,))), params


def dense_jacobian(model, X):
    f, params = functional(model)
    jac = jacrev(lambda ps: f(ps, X).flatten())(params)
    return torch.cat([j.flatten(1) for j in jac], 1)


def loss_hessian(model, X, y, lossf):
    with torch.no_grad():
        out = model(X)
    return hessian(lambda o: lossf(o.reshape(out.shape), y))(out.flatten())


def per_sample_grads(model, X, y, lossf):
    """``∇θ [ℓ(F(x_n), y_n) · c]`` with ``c = 1/N`` for mean reduction (BackPACK's grad_batch)."""
    f, params = functional(model)
    scale = 1.0 / X.shape[0] if lossf.reduction == "mean" else 1.0

    def one(x, t):
        return grad(lambda ps: lossf(f(ps, x[None]), t[None]) * scale)(params)
    gs = vmap(one)(X, y)
    return torch.cat([g.flatten(1) for g in gs], 1)  # (N, P)


# ---------------------------------------------------------------------------------- first order
@pytest.mark.parametrize("seed,loss", [(0, "ce"), (1, "mse")])
def test_first_order_extensions_match_torch_func(seed, loss):
    model, X, y, lossf = problem(seed, "tanh", loss)
    mb = run_backpack(model, lossf, X, y, BatchGrad(), BatchL2Grad(), SumGradSquared(),
                      Variance())
    G = per_sample_grads(model, X, y, lossf)
    N = X.shape[0]
    assert torch.allclose(flat(mb, "grad_batch", 1), G, rtol=0, atol=TOL)
    l2 = torch.stack([p.batch_l2 for p in mb.parameters()]).sum(0)
    assert torch.allclose(l2, G.pow(2).sum(1), rtol=0, atol=TOL)
    assert torch.allclose(flat(mb, "sum_grad_squared"), G.pow(2).sum(0), rtol=0, atol=TOL)
    var = G.pow(2).sum(0) / N - (G.sum(0) / N) ** 2
    assert torch.allclose(flat(mb, "variance"), var, rtol=0, atol=TOL)
    assert torch.allclose(flat(mb, "grad"), G.sum(0), rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------- second order
@pytest.mark.parametrize("seed,activation,loss", [(0, "tanh", "ce"), (1, "gelu", "mse"),
                                                  (2, "relu", "ce")])
def test_exact_second_order_extensions_match_curvlinops_and_torch_func(seed, activation, loss):
    model, X, y, lossf = problem(seed, activation, loss)
    mb = run_backpack(model, lossf, X, y, DiagGGNExact(), BatchDiagGGNExact(), SqrtGGNExact(),
                      KFLR())
    G = to_dense(GGNLinearOperator(model, lossf, list(model.parameters()), [(X, y)]))
    assert torch.allclose(flat(mb, "diag_ggn_exact"), G.diag(), rtol=0, atol=TOL)
    # per-sample GGNs G_n = J_nᵀ (∇²_F L)_n J_n from the dense Jacobian
    J, HF = dense_jacobian(model, X), loss_hessian(model, X, y, lossf)
    N, C = X.shape[0], 3
    Gn = [J[n * C:(n + 1) * C].T @ HF[n * C:(n + 1) * C, n * C:(n + 1) * C] @ J[n * C:(n + 1) * C]
          for n in range(N)]
    assert torch.allclose(flat(mb, "diag_ggn_exact_batch", 1),
                          torch.stack([g.diag() for g in Gn]), rtol=0, atol=TOL)
    S = flat(mb, "sqrt_ggn_exact", 2)  # (C, N, P)
    assert torch.allclose(S.flatten(0, 1).T @ S.flatten(0, 1), G, rtol=0, atol=TOL)
    for n in range(N):
        assert torch.allclose(S[:, n].T @ S[:, n], Gn[n], rtol=0, atol=TOL)
    # KFLR: G-factor = Σ_n J_{b,n}ᵀ H_n J_{b,n} (the GGN's bias block), A-factor = sᵀs / N
    names = [nm for nm, _ in model.named_parameters()]
    offsets = torch.tensor([0] + [p.numel() for p in model.parameters()]).cumsum(0).tolist()
    _, acts = model.features_with_activations(X)
    for i, nm in enumerate(names):
        if not nm.endswith("weight"):
            continue
        b = slice(offsets[i + 1], offsets[i + 2])  # the layer's bias follows its weight
        blk, half = int(nm.split(".")[1]), nm.split(".")[2]
        s = getattr(acts[blk], f"s_{half}")
        w = dict(mb.named_parameters())[nm]
        bias = dict(mb.named_parameters())[nm.replace("weight", "bias")]
        Gf, Af = w.kflr
        assert torch.allclose(Gf, G[b, b], rtol=0, atol=TOL)
        assert torch.allclose(Af, s.T @ s / N, rtol=0, atol=TOL)
        assert torch.allclose(bias.kflr[0], G[b, b], rtol=0, atol=TOL)


def _replayed_sqrt(model, lossf, X, y, seed, mc_samples):
    """The loss's MC square root ``S`` ([M, N, C]) as BackPACK draws it after ``manual_seed``."""
    lb = extend(copy.deepcopy(lossf))
    with torch.no_grad():
        out = model(X)
    out.requires_grad_(True)
    lb(out, y)
    deriv = CrossEntropyLossDerivatives() if isinstance(lossf, nn.CrossEntropyLoss) \
        else MSELossDerivatives()
    torch.manual_seed(seed)
    return deriv.sqrt_hessian_sampled(lb, None, None, mc_samples=mc_samples).detach()


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_monte_carlo_extensions_match_the_replayed_sample(loss):
    model, X, y, lossf = problem(3, "tanh", loss)
    J = dense_jacobian(model, X)
    N, C, M = X.shape[0], 3, 4
    S = _replayed_sqrt(model, lossf, X, y, seed=11, mc_samples=M)
    # Jᵀ S per sample and MC column: (M, N, P)
    JS = torch.stack([torch.stack([J[n * C:(n + 1) * C].T @ S[m, n] for n in range(N)])
                      for m in range(M)])
    for ext, field in [(DiagGGNMC(mc_samples=M), "diag_ggn_mc"),
                       (BatchDiagGGNMC(mc_samples=M), "diag_ggn_mc_batch"),
                       (SqrtGGNMC(mc_samples=M), "sqrt_ggn_mc"), (KFAC(mc_samples=M), "kfac")]:
        torch.manual_seed(11)
        mb = run_backpack(model, lossf, X, y, ext)
        if field == "diag_ggn_mc":
            assert torch.allclose(flat(mb, field), JS.pow(2).sum((0, 1)), rtol=0, atol=TOL)
        elif field == "diag_ggn_mc_batch":
            assert torch.allclose(flat(mb, field, 1), JS.pow(2).sum(0), rtol=0, atol=TOL)
        elif field == "sqrt_ggn_mc":
            assert torch.allclose(flat(mb, field, 2), JS, rtol=0, atol=TOL)
        else:
            offsets = torch.tensor([0] + [p.numel() for p in model.parameters()]).cumsum(0)
            for i, (nm, p) in enumerate(mb.named_parameters()):
                if nm.endswith("bias"):
                    Jb = JS[..., offsets[i]:offsets[i + 1]]  # = J_{u}ᵀ S: bias enters additively
                    ref = torch.einsum("mni,mnj->ij", Jb, Jb)
                    assert torch.allclose(p.kfac[0], ref, rtol=0, atol=TOL)
                    w = dict(mb.named_parameters())[nm.replace("bias", "weight")]
                    assert torch.allclose(w.kfac[0], ref, rtol=0, atol=TOL)


def _dense_hessian_diagonals(model, X, y, lossf):
    """``diag ∇²_θ L`` and, per sample, ``diag ∇²_θ (c ℓ_n)`` by ``torch.func.hessian`` of the
    flat-parameter loss (no BackPACK, no curvlinops)."""
    f, params = functional(model)
    sizes = [p.numel() for p in params]
    scale = 1.0 / X.shape[0] if lossf.reduction == "mean" else 1.0

    def unflat(theta):
        return [v.reshape(p.shape) for v, p in zip(theta.split(sizes), params, strict=True)]

    def full_loss(theta):
        return lossf(f(unflat(theta), X), y)

    def sample_loss(theta, x, t):
        return lossf(f(unflat(theta), x[None]), t[None]) * scale
    theta = torch.cat([p.flatten() for p in params])
    per = torch.stack([hessian(sample_loss)(theta, X[n], y[n]).diag() for n in range(len(X))])
    return hessian(full_loss)(theta).diag(), per


@pytest.mark.parametrize("seed,activation,loss", [(0, "relu", "ce"), (1, "relu", "mse"),
                                                  (2, "gelu", "ce"), (3, "tanh", "mse"),
                                                  (4, "softplus", "ce"), (5, "gelu", "mse")])
def test_diag_hessian_matches_torch_func(seed, activation, loss):
    """DiagHessian/BatchDiagHessian equal the ``torch.func`` Hessian diagonals to 1e-10 (float64);
    for smooth σ this needs the σ'' residuals (their omission is off by ~1e-2)."""
    model, X, y, lossf = problem(seed, activation, loss)
    mb = run_backpack(model, lossf, X, y, DiagHessian(), BatchDiagHessian())
    ref, per = _dense_hessian_diagonals(model, X, y, lossf)
    assert torch.allclose(flat(mb, "diag_h"), ref, rtol=0, atol=TOL)
    assert torch.allclose(flat(mb, "diag_h_batch", 1), per, rtol=0, atol=TOL)
    H = to_dense(HessianLinearOperator(model, lossf, list(model.parameters()), [(X, y)]))
    G = to_dense(GGNLinearOperator(model, lossf, list(model.parameters()), [(X, y)]))
    assert (H - G).abs().max() > 1e-6  # H ≠ GGN: the check is not vacuous
    if activation != "relu":  # the σ'' terms are really there on the diagonal
        assert (ref - G.diag()).abs().max() > 1e-4


def test_diag_hessian_without_compression_matches_too(monkeypatch):
    """The uncompressed factor lists (``compress`` switched off) give the same diagonals: both
    representations of the per-sample Hessians are exact."""
    model, X, y, lossf = problem(6, "gelu", "ce")
    ref, per = _dense_hessian_diagonals(model, X, y, lossf)
    monkeypatch.setattr(bp_host, "compress", lambda bp: bp)
    mb = run_backpack(model, lossf, X, y, DiagHessian(), BatchDiagHessian())
    assert torch.allclose(flat(mb, "diag_h"), ref, rtol=0, atol=TOL)
    assert torch.allclose(flat(mb, "diag_h_batch", 1), per, rtol=0, atol=TOL)


@pytest.mark.parametrize("path", ["cholesky", "eigh fallback"])
def test_compress_keeps_every_per_sample_hessian(path, monkeypatch):
    """``compress``: same ``Σ_i ε_i S_iᵀ S_i`` per sample (dense einsum oracle; an indefinite
    sample, a zero one), at most 2w columns, and short lists untouched."""
    if path == "eigh fallback":
        def failing(A):
            L, info = torch.linalg.cholesky(A), torch.zeros(A.shape[0], dtype=torch.int32)
            return L, info + 1
        monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    gen = torch.Generator().manual_seed(0)
    S1, S2 = (torch.randn(9, 4, 3, generator=gen, dtype=F64) for _ in range(2))
    S1[:, 3], S2[:, 3] = 0.0, 0.0                                     # sample 3: H = 0
    bp = {"matrices": [S1, S2], "signs": [1.0, -1.0]}
    out = bp_host.compress(bp)
    assert sum(m.shape[0] for m in out["matrices"]) == 6 and out["signs"] == [1.0, -1.0]
    ref = torch.einsum("kni,knj->nij", S1, S1) - torch.einsum("kni,knj->nij", S2, S2)
    assert torch.linalg.eigvalsh(ref[0]).min() < 0 < torch.linalg.eigvalsh(ref[0]).max()
    got = sum(s * torch.einsum("kni,knj->nij", m, m)
              for m, s in zip(out["matrices"], out["signs"], strict=True))
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    short = {"matrices": [S1[:5]], "signs": [1.0]}
    assert bp_host.compress(short) is short


@pytest.mark.parametrize("seed,activation,loss", [(7, "gelu", "ce"), (8, "tanh", "mse")])
def test_diag_hessian_minus_diag_ggn_is_the_nme_diagonal(seed, activation, loss):
    """``DiagHessian − DiagGGNExact = diag(NME)``: against ``metrics.decompose``'s NME operator
    (``H − G`` of curvlinops, on the un-extended model) and its surrogate-Hessian form, 1e-10. The
    last half-layer's own weights carry no σ'' term (``u`` is linear in ``W`` and nothing is
    downstream), every other half-layer's do."""
    from gnrev_plugin.metrics import decompose

    model, X, y, lossf = problem(seed, activation, loss)
    mb = run_backpack(model, lossf, X, y, DiagHessian(), DiagGGNExact())
    nme_diag = flat(mb, "diag_h") - flat(mb, "diag_ggn_exact")
    dec = decompose(model, lossf, (X, y))
    assert torch.allclose(nme_diag, dec.dense("nme").diag(), rtol=0, atol=TOL)
    assert torch.allclose(nme_diag, dec.dense("nme_surrogate").diag(), rtol=0, atol=TOL)
    last = dec.block_indices("blocks.1.g")
    others = [i for i in range(dec.num_params) if i not in set(last)]
    assert nme_diag[last].abs().max() < 1e-13
    assert nme_diag[others].abs().max() > 1e-4


# ---------------------------------------------------------------------------------- composition
def test_coupling_block_is_a_leaf_inside_a_backpack_sequential():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), AdditiveCoupling(6, 7, "tanh", init_std=0.5),
                        AdditiveCoupling(6, 4, "relu", init_std=0.5), nn.Linear(6, 3)).double()
    X, y = torch.randn(7, 5, dtype=F64), torch.randint(0, 3, (7,))
    lossf = nn.CrossEntropyLoss()
    mb = run_backpack(net, lossf, X, y, DiagGGNExact(), BatchGrad(), KFLR())
    G = to_dense(GGNLinearOperator(net, lossf, list(net.parameters()), [(X, y)]))
    # the first Linear's quantities need the blocks' backpropagated input quantity
    assert torch.allclose(flat(mb, "diag_ggn_exact"), G.diag(), rtol=0, atol=TOL)
    assert torch.allclose(flat(mb, "grad_batch", 1), per_sample_grads(net, X, y, lossf),
                          rtol=0, atol=TOL)
    assert torch.allclose(mb[0].bias.kflr[0], G[30:36, 30:36], rtol=0, atol=TOL)


def test_revmlp_backpropagates_to_a_preceding_backpack_module():
    torch.manual_seed(5)
    rev = RevMLP(6, 5, 2, 3, activation="tanh", linear_first_block=False, init_std=0.5,
                 seed=5).double()
    net = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), rev).double()
    X, y = torch.randn(6, 4, dtype=F64), torch.randn(6, 3, dtype=F64)
    lossf = nn.MSELoss()
    with pytest.raises(NotImplementedError, match="Unflatten"):
        run_backpack(net, lossf, X, y, DiagGGNExact())  # BackPACK itself lacks Unflatten
    net = nn.Sequential(nn.Linear(4, 6), rev).double()
    mb = run_backpack(net, lossf, X, y, DiagGGNExact(), SqrtGGNExact())
    G = to_dense(GGNLinearOperator(net, lossf, list(net.parameters()), [(X, y)]))
    assert torch.allclose(flat(mb, "diag_ggn_exact"), G.diag(), rtol=0, atol=TOL)


def test_revmlp_without_readout_and_in_float32():
    torch.manual_seed(12)
    model = RevMLP(6, 5, 2, None, activation="gelu", linear_first_block=True, init_std=0.5,
                   seed=12).double()
    X, y = torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64)
    lossf = nn.MSELoss()
    mb = run_backpack(model, lossf, X, y, DiagGGNExact(), BatchGrad())
    G = to_dense(GGNLinearOperator(model, lossf, list(model.parameters()), [(X, y)]))
    assert torch.allclose(flat(mb, "diag_ggn_exact"), G.diag(), rtol=0, atol=TOL)
    m32 = copy.deepcopy(model).float()
    mb32 = run_backpack(m32, lossf, X.float(), y.float(), DiagGGNExact())
    assert mb32.blocks[0].f.linear.weight.diag_ggn_exact.dtype == torch.float32
    assert torch.allclose(flat(mb32, "diag_ggn_exact").double(), G.diag(), rtol=1e-4, atol=1e-6)


def test_subsampling():
    model, X, y, lossf = problem(6, "tanh", "ce", n=6)
    sub = [1, 4]
    full = run_backpack(model, lossf, X, y, BatchGrad(), SqrtGGNExact())
    part = run_backpack(model, lossf, X, y, BatchGrad(subsampling=sub),
                        SqrtGGNExact(subsampling=sub))
    assert torch.allclose(flat(part, "grad_batch", 1), flat(full, "grad_batch", 1)[sub],
                          rtol=0, atol=TOL)
    assert flat(part, "sqrt_ggn_exact", 2).shape[1] == len(sub)
    assert torch.allclose(flat(part, "sqrt_ggn_exact", 2), flat(full, "sqrt_ggn_exact", 2)[:, sub],
                          rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------- API, errors
def test_register_returns_the_same_instances_and_all_extensions_runs():
    exts = (DiagGGNExact(), BatchGrad())
    assert register(*exts) == exts and all(a is b for a, b in zip(register(*exts), exts,
                                                                   strict=True))
    model, X, y, lossf = problem(7, "relu", "ce")
    mb, lb = extend(copy.deepcopy(model)), extend(copy.deepcopy(lossf))
    with backpack(*all_extensions(diag_hessian=True)):
        lb(mb(X), y).backward()
    fields = ["grad_batch", "batch_l2", "sum_grad_squared", "variance", "diag_ggn_exact",
              "diag_ggn_mc", "sqrt_ggn_exact", "kfac", "kflr", "diag_h"]
    for p in mb.parameters():
        assert all(hasattr(p, f) for f in fields)
    assert set(SUPPORTED_EXTENSIONS) >= {type(e) for e in all_extensions(diag_hessian=True)}


def test_unsupported_combinations_name_the_extension():
    with pytest.raises(NotImplementedError, match="KFRA is not supported"):
        register(KFRA())
    with pytest.raises(NotImplementedError, match="HMP is not supported"):
        register(HMP())
    with pytest.raises(ValueError, match="extension instances"):
        register(DiagGGNExact)
    model, X, y, lossf = problem(8, "tanh", "ce")
    seq = nn.Sequential(AdditiveCoupling(6, 4, "tanh", init_std=0.5), nn.Flatten()).double()
    with pytest.raises(NotImplementedError, match=r"DiagGGNExact .*inputs \(N, d\) only"):
        run_backpack(seq, nn.MSELoss(), torch.randn(3, 2, 6, dtype=F64),
                     torch.randn(3, 12, dtype=F64), DiagGGNExact())
    # without register(), BackPACK's own error names the module
    mb, lb = extend(copy.deepcopy(model)), extend(copy.deepcopy(lossf))
    with pytest.raises(NotImplementedError, match="diag_ggn_exact.*RevMLP"), \
            backpack(DiagGGNExact()):
        lb(mb(X), y).backward()


def test_curvlinops_must_get_an_unextended_copy():
    """The spec's warning, checked: curvlinops cannot trace an extended model; a deep copy
    taken before ``extend`` (what every test here does) is unaffected."""
    model, X, y, lossf = problem(9, "tanh", "ce")
    plain = copy.deepcopy(model)
    extended = extend(model)
    with pytest.raises(RuntimeError):
        to_dense(GGNLinearOperator(extended, lossf, list(extended.parameters()), [(X, y)]))
    G = to_dense(GGNLinearOperator(plain, lossf, list(plain.parameters()), [(X, y)]))
    assert torch.isfinite(G).all()
    CTX.remove_hooks()


# ---------------------------------------------------------------------------------- enable()
def _wrapped_layers(fn) -> int:
    """How many gnrev wrappers sit on top of a patched BackPACK attribute."""
    n = 0
    while getattr(fn, "__gnrev_wrapped__", None) is not None:
        fn, n = fn.__gnrev_wrapped__, n + 1
    return n


def test_enable_reaches_unregistered_instances_created_before_and_after():
    """After ``enable()`` plain BackPACK instances (one made before the call) compute on RevMLP
    what the dense oracles give; after ``disable()`` BackPACK's own error is back."""
    model, X, y, lossf = problem(11, "gelu", "ce")
    before = DiagGGNExact()
    bp_host.enable()
    try:
        mb, lb = extend(copy.deepcopy(model)), extend(copy.deepcopy(lossf))
        with backpack(before, BatchGrad(), DiagHessian()):
            lb(mb(X), y).backward()
    finally:
        bp_host.disable()
    G = to_dense(GGNLinearOperator(model, lossf, list(model.parameters()), [(X, y)]))
    assert torch.allclose(flat(mb, "diag_ggn_exact"), G.diag(), rtol=0, atol=TOL)
    assert torch.allclose(flat(mb, "diag_h"), _dense_hessian_diagonals(model, X, y, lossf)[0],
                          rtol=0, atol=TOL)
    assert torch.allclose(flat(mb, "grad_batch", 1), per_sample_grads(model, X, y, lossf),
                          rtol=0, atol=TOL)
    mb, lb = extend(copy.deepcopy(model)), extend(copy.deepcopy(lossf))
    with pytest.raises(NotImplementedError, match="diag_ggn_exact.*RevMLP"), \
            backpack(DiagGGNExact()):
        lb(mb(X), y).backward()


def test_enable_is_idempotent_and_disable_restores_backpack():
    from backpack.extensions.backprop_extension import BackpropExtension

    call, get_hook = BackpropExtension.__dict__["__call__"], CTX.__dict__["get_extension_hook"]
    bp_host.enable()
    patched = BackpropExtension.__dict__["__call__"]
    bp_host.enable()
    with bp_host.enabled():
        assert bp_host.is_enabled()
    assert bp_host.is_enabled()  # enabled() leaves an enable() it found in place
    assert BackpropExtension.__dict__["__call__"] is patched and patched is not call
    assert _wrapped_layers(patched) == 1
    bp_host.disable()
    assert BackpropExtension.__dict__["__call__"] is call
    assert CTX.__dict__["get_extension_hook"] is get_hook
    bp_host.disable()
    assert not bp_host.is_enabled()
    with bp_host.enabled():
        assert _wrapped_layers(BackpropExtension.__dict__["__call__"]) == 1
    assert BackpropExtension.__dict__["__call__"] is call


def test_enable_and_disable_from_many_threads(monkeypatch):
    """Concurrent calls install exactly one wrapper and remove it (a slow installer makes a
    missing lock show up deterministically)."""
    import threading
    import time

    from backpack.extensions.backprop_extension import BackpropExtension

    call = BackpropExtension.__dict__["__call__"]
    slow = compat_backpack.install_module_extension_fallback

    def slow_install(fallback):
        time.sleep(0.02)
        return slow(fallback)
    monkeypatch.setattr(compat_backpack, "install_module_extension_fallback", slow_install)

    def run(fn):
        barrier = threading.Barrier(6)

        def work():
            barrier.wait()
            fn()
        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    run(bp_host.enable)
    assert _wrapped_layers(BackpropExtension.__dict__["__call__"]) == 1
    run(bp_host.disable)
    assert BackpropExtension.__dict__["__call__"] is call and not bp_host.is_enabled()


def test_an_instance_s_own_entry_wins_and_fail_modes_are_kept():
    from backpack.extensions.firstorder.base import FirstOrderBackpropExtension

    model, X, y, lossf = problem(12, "relu", "ce")

    class Recorder(ModuleExtension):
        calls = 0

        def __call__(self, ext, module, g_inp, g_out):
            Recorder.calls += 1

    class NoLinearRule(FirstOrderBackpropExtension):
        def __init__(self):
            super().__init__(savefield="nothing", module_exts={}, fail_mode="WARNING")

    with bp_host.enabled():
        own = BatchGrad()
        own.set_module_extension(RevMLP, Recorder())
        mb, lb = extend(copy.deepcopy(model)), extend(copy.deepcopy(lossf))
        with backpack(own):
            lb(mb(X), y).backward()
        assert Recorder.calls == 1 and not any(hasattr(p, "grad_batch") for p in mb.parameters())
        mb, lb = extend(copy.deepcopy(model)), extend(copy.deepcopy(lossf))
        with pytest.warns(UserWarning, match="nothing does not have an extension.*RevMLP"), \
                backpack(NoLinearRule()):
            lb(mb(X), y).backward()
        mb, lb = extend(copy.deepcopy(model)), extend(copy.deepcopy(lossf))
        with pytest.raises(NotImplementedError, match="KFRA is not supported"), backpack(KFRA()):
            lb(mb(X), y).backward()


def test_extension_hook_runs_on_the_inner_linears_once_per_backward():
    """BackPACK's ``extension_hook`` (what Cockpit's per-parameter hooks use) sees each inner
    ``nn.Linear`` with its quantities stored, not the RevMLP leaf; repeated contexts do not
    stack wrappers, and ``disable()`` leaves no wrapper behind."""
    model, X, y, lossf = problem(13, "tanh", "ce")
    with bp_host.enabled():
        mb, lb = extend(copy.deepcopy(model)), extend(copy.deepcopy(lossf))
        inner = [lin for b in mb.blocks for lin in (b.f.linear, b.g.linear)]
        for _ in range(3):
            seen = []

            def hook(module, seen=seen):
                seen.append(module)
                for p in module.parameters(recurse=False):
                    assert p.grad_batch.shape == (X.shape[0], *p.shape)
            mb.zero_grad()
            with backpack(BatchGrad(), extension_hook=hook):
                lb(mb(X), y).backward()
            ids = [id(m) for m in seen]
            assert sorted(i for i in ids if i in {id(m) for m in inner}) == \
                sorted(id(m) for m in inner) and id(mb) not in ids
            assert _wrapped_layers(CTX.get_extension_hook()) == 1
    assert _wrapped_layers(CTX.extension_hook) == 0


# ---------------------------------------------------------------------------------- Cockpit-style
def norm_test_and_histogram(model: nn.Module, bins: int = 10) -> tuple[float, torch.Tensor]:
    """A Cockpit-style per-sample statistic from BackPACK fields only (works on any model).

    Bollapragada et al.'s norm test ``√(Σ_n ‖ĝ_n − g‖² / (B(B−1))) / ‖g‖`` with unscaled
    per-sample gradients ``ĝ_n = B·grad_batch_n`` and the mini-batch gradient ``g``, via
    ``Σ_n ‖ĝ_n − g‖² = B² Σ_n batch_l2_n − B ‖g‖²``; and Cockpit's GradHist1d (a histogram of
    the per-sample gradient entries).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    B = params[0].grad_batch.shape[0]
    g2 = sum(p.grad.pow(2).sum() for p in params)
    l2 = sum(p.batch_l2.sum() for p in params)
    stat = ((B**2 * l2 - B * g2) / (B * (B - 1))).sqrt() / g2.sqrt()
    entries = torch.cat([(B * p.grad_batch).flatten() for p in params])
    return float(stat), torch.histc(entries, bins=bins, min=-1.0, max=1.0)


@pytest.mark.parametrize("kind", ["mlp", "revmlp"])
def test_cockpit_style_statistic_runs_unchanged_on_revmlp(kind):
    model, X, y, lossf = problem(10, "tanh", "ce", n=8)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    mb = run_backpack(model, lossf, X, y, BatchGrad(), BatchL2Grad())
    stat, hist = norm_test_and_histogram(mb)
    G = per_sample_grads(model, X, y, lossf) * X.shape[0]  # unscaled ĝ_n
    g = G.mean(0)
    ref = ((G - g).pow(2).sum() / (8 * 7)).sqrt() / g.norm()
    assert abs(stat - ref.item()) <= 1e-12 * max(1.0, ref.item())
    assert torch.equal(hist, torch.histc(G.flatten(), bins=10, min=-1.0, max=1.0))


@pytest.fixture(autouse=True)
def _no_leftover_hooks():
    yield
    bp_host.disable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CTX.remove_hooks()
