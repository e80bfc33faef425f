"""The curvlinops adapter: every operator against a dense float64 oracle, and curvlinops' tools on it.

Oracles are built independently with ``torch.func`` (``jacrev``/``hessian`` of the flattened
network and of the loss) and ``torch.linalg.pinv``; tolerances are 1e-10 in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from curvlinops import (
    CGInverseLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
    hutchinson_diag,
    hutchinson_trace,
    lanczos_approximate_spectrum,
)
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.func import functional_call, hessian, jacrev

from gnrev_plugin.hosts.curvlinops import (
    GaussNewtonStepOperator,
    NMELinearOperator,
    NTKLinearOperator,
    to_dense,
)
from gnrev_plugin.nn import RevMLP

TOL = 1e-10
F64 = torch.float64


def make_problem(seed: int, activation: str = "tanh", loss: str = "mse", n: int = 4,
                 linear_first_block: bool = False, num_blocks: int = 2):
    torch.manual_seed(seed)
    model = RevMLP(6, 7, num_blocks, 3, activation=activation,
                   linear_first_block=linear_first_block, init_std=0.5, seed=seed).double()
    X = torch.randn(n, 6, dtype=F64)
    if loss == "mse":
        y, lossf = torch.randn(n, 3, dtype=F64), nn.MSELoss()
    else:
        y, lossf = torch.randint(0, 3, (n,)), nn.CrossEntropyLoss()
    return model, X, y, lossf


def flat_fn(model: nn.Module, X: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def f(*ps):
        return functional_call(model, dict(zip(names, ps, strict=True)), (X,))
    return f, params


def dense_jacobian(model, X):
    f, params = flat_fn(model, X)
    jac = jacrev(lambda *ps: f(*ps).flatten(), argnums=tuple(range(len(params))))(*params)
    return torch.cat([j.flatten(1) for j in jac], dim=1)  # (N·C, P), sample-major rows


def dense_hessian_ggn(model, X, y, lossf):
    """Full-data H (torch.func.hessian of the flat loss) and G = Jᵀ ∇²_F L J."""
    f, params = flat_fn(model, X)
    sizes = [p.numel() for p in params]
    shapes = [p.shape for p in params]

    def loss_flat(theta):
        ps = [t.reshape(s) for t, s in zip(theta.split(sizes), shapes, strict=True)]
        return lossf(f(*ps), y)
    theta = torch.cat([p.flatten() for p in params])
    H = hessian(loss_flat)(theta)
    out = f(*params)
    HF = hessian(lambda o: lossf(o.reshape(out.shape), y))(out.flatten())
    J = dense_jacobian(model, X)
    return H, J.T @ HF @ J


# ---------------------------------------------------------------------------------- NME
@pytest.mark.parametrize("seed,activation,loss", [(0, "tanh", "mse"), (1, "tanh", "mse"),
                                                  (0, "gelu", "ce"), (1, "relu", "ce")])
def test_nme_equals_dense_hessian_minus_ggn(seed, activation, loss):
    model, X, y, lossf = make_problem(seed, activation, loss)
    params = list(model.parameters())
    data = [(X[:2], y[:2]), (X[2:], y[2:])]  # two batches: renormalisation of the mean
    nme = to_dense(NMELinearOperator(model, lossf, params, data))
    H, G = dense_hessian_ggn(model, X, y, lossf)
    assert torch.allclose(nme, H - G, rtol=0, atol=TOL)
    assert (H - G).abs().max() > 1e-4  # a non-trivial NME, not 0 == 0
    # and it agrees with curvlinops' own H − G
    H_cl = to_dense(HessianLinearOperator(model, lossf, params, data))
    G_cl = to_dense(GGNLinearOperator(model, lossf, params, data))
    assert torch.allclose(nme, H_cl - G_cl, rtol=0, atol=TOL)


def test_nme_block_of_the_last_half_layer_is_zero():
    """The last half-layer's ``(W, b)`` enter ``F`` linearly (``F = (… + σ(Y1 C_g) W_gᵀ + b_g …) U``),
    so ``∇²F`` restricted to them vanishes and so does their NME block, exactly."""
    model, X, y, lossf = make_problem(3, "tanh")
    last = [model.blocks[-1].g.linear.weight, model.blocks[-1].g.linear.bias]
    nme = to_dense(NMELinearOperator(model, lossf, last, [(X, y)]))
    assert nme.abs().max() == 0.0


# ---------------------------------------------------------------------------------- NTK
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ntk_equals_dense_jjt(seed):
    model, X, _, _ = make_problem(seed, "tanh", n=5)
    op = NTKLinearOperator(model, list(model.parameters()), X)
    J = dense_jacobian(model, X)
    assert op.shape == (15, 15)
    assert torch.allclose(to_dense(op), J @ J.T, rtol=0, atol=TOL)
    # list format: (N, C) in, (N, C) out, same sample-major layout as model(X)
    v = torch.randn(5, 3, dtype=F64)
    (out,) = op @ [v]
    assert torch.allclose(out.flatten(), J @ J.T @ v.flatten(), rtol=0, atol=TOL)


def test_ntk_of_a_parameter_subset_and_multiple_batches():
    model, X, y, _ = make_problem(4, "gelu", n=6)
    sub = [model.blocks[0].f.linear.weight]
    op = NTKLinearOperator(model, sub, [(X[:3], y[:3]), (X[3:], y[3:])])
    f, params = flat_fn(model, X)
    names = [n for n, _ in model.named_parameters()]
    i = names.index("blocks.0.f.linear.weight")

    def g(w):
        ps = list(params)
        ps[i] = w
        return f(*ps).flatten()
    Jw = jacrev(g)(params[i]).flatten(1)
    assert torch.allclose(to_dense(op), Jw @ Jw.T, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------- GN step
def dense_right_inverse(model: RevMLP, X: torch.Tensor) -> torch.Tensor:
    """Buffelli et al.'s per-block right inverse, column by column, from dense per-sample
    Jacobians (``torch.func.jacrev``) and ``torch.linalg.pinv`` only; all blocks full rank."""
    n, d = X.shape
    half, L = d // 2, len(model.blocks)
    U = model.readout
    xs = [X]  # block inputs
    with torch.no_grad():
        for b in model.blocks:
            xs.append(b(xs[-1]))

    def tail(ell):  # X^(ell+1) (output of block ell) -> X^(L), one sample
        def fn(z):
            for b in model.blocks[ell + 1:]:
                z = b(z.unsqueeze(0)).squeeze(0)
            return z
        return fn

    with_bias = lambda s: torch.cat([s, torch.ones(n, 1, dtype=F64)], 1)  # noqa: E731
    cols = []
    for col in torch.eye(n * 3, dtype=F64):
        T = col.reshape(n, 3)
        E = T @ torch.linalg.pinv(U)
        deltas = []
        for ell, b in enumerate(model.blocks):
            Tl = torch.stack([jacrev(tail(ell))(xs[ell + 1][i]) for i in range(n)])
            El = torch.linalg.solve(Tl, E.unsqueeze(-1)).squeeze(-1) / L
            x1, x2 = xs[ell][:, :half], xs[ell][:, half:]
            A_f = with_bias(b.f.activation(x2 @ b.f.projection))
            th_f = torch.linalg.pinv(A_f) @ El[:, :half]
            y1 = x1 + b.f(x2)
            A_g = with_bias(b.g.activation(y1 @ b.g.projection))
            Jg = torch.stack([jacrev(lambda z, b=b: b.g(z.unsqueeze(0)).squeeze(0))(y1[i])
                              for i in range(n)])
            m = (Jg @ (A_f @ th_f).unsqueeze(-1)).squeeze(-1)
            th_g = torch.linalg.pinv(A_g) @ (El[:, half:] - m)
            for th in (th_f, th_g):
                deltas += [th[:-1].T.flatten(), th[-1]]
        cols.append(torch.cat(deltas))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_gn_step_operator_is_a_right_inverse_and_matches_dense_oracle(seed, activation):
    model, X, _, _ = make_problem(seed, activation, n=4)
    op = GaussNewtonStepOperator(model, X)
    R = to_dense(op)
    P = sum(p.numel() for p in model.parameters())
    assert R.shape == (P, 12)
    J = dense_jacobian(model, X)
    assert torch.allclose(J @ R, torch.eye(12, dtype=F64), rtol=0, atol=TOL)
    assert torch.allclose(R, dense_right_inverse(model, X), rtol=0, atol=TOL)


def test_gn_step_operator_with_a_linear_first_block():
    model, X, _, _ = make_problem(5, "relu", n=3, linear_first_block=True, num_blocks=3)
    R = to_dense(GaussNewtonStepOperator(model, X))
    assert torch.allclose(dense_jacobian(model, X) @ R, torch.eye(9, dtype=F64), rtol=0, atol=TOL)


def test_j_at_gn_is_the_identity_for_curvlinops_tools():
    model, X, y, _ = make_problem(6, "tanh", n=4)
    J = JacobianLinearOperator(model, list(model.parameters()), [(X, y)])
    JR = J @ GaussNewtonStepOperator(model, X)
    eye = torch.eye(12, dtype=F64)
    assert torch.allclose(to_dense(JR), eye, rtol=0, atol=TOL)
    # Rademacher Hutchinson on the identity is exact: vᵀ I v = dim for every probe
    assert abs(hutchinson_trace(JR, num_matvecs=5).item() - 12.0) < 1e-9
    vals = eigsh(JR.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(vals, 1.0, atol=1e-9)


def test_gn_step_operator_rejects_other_models():
    with pytest.raises(TypeError, match="needs a gnrev_plugin.nn.RevMLP"):
        GaussNewtonStepOperator(nn.Linear(2, 2), torch.randn(3, 2))


def test_gn_step_operator_adjoint_is_the_transpose():
    model, X, _, _ = make_problem(0)
    op = GaussNewtonStepOperator(model, X)
    R = to_dense(op)
    assert torch.allclose(to_dense(op.adjoint()), R.T, rtol=0, atol=TOL)
    v = [torch.randn_like(p) for p in model.parameters()]
    (out,) = op.adjoint() @ v
    flat = torch.cat([t.flatten() for t in v])
    assert out.shape == (4, 3) and torch.allclose(out.flatten(), R.T @ flat, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------- curvlinops tools
def _hutchinson_within_5_sd(op, A: torch.Tensor, m: int) -> None:
    """Rademacher Hutchinson: unbiased, Var = 2(‖A‖_F² − Σ A_ii²)/m for symmetric A."""
    torch.manual_seed(0)
    est = hutchinson_trace(op, num_matvecs=m).item()
    sd = (2 * (A.pow(2).sum() - A.diag().pow(2).sum()) / m).sqrt().item()
    assert abs(est - A.trace().item()) <= 5 * sd + 1e-12


@pytest.mark.parametrize("which", ["nme", "ntk"])
def test_curvlinops_estimators_spectrum_and_eigsh_run_on_our_operators(which):
    model, X, y, lossf = make_problem(7, "tanh", n=4)
    params = list(model.parameters())
    if which == "nme":
        op = NMELinearOperator(model, lossf, params, [(X, y)])
    else:
        op = NTKLinearOperator(model, params, X)
    A = to_dense(op)
    assert torch.allclose(A, A.T, rtol=0, atol=TOL)
    m = min(10, op.shape[0] - 1)
    _hutchinson_within_5_sd(op, A, m)
    torch.manual_seed(1)
    diag = hutchinson_diag(op, num_matvecs=m)
    assert diag.shape == (op.shape[0],) and torch.isfinite(diag).all()
    grid, density = lanczos_approximate_spectrum(op, ncv=min(8, op.shape[0] - 1), num_points=64)
    assert grid.shape == density.shape == (64,) and (density >= 0).all()
    exact = torch.linalg.eigvalsh(A)
    top = eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), exact[-3:].numpy(), rtol=0, atol=1e-8)


def test_cg_inverse_of_the_ntk():
    model, X, _, _ = make_problem(8, "tanh", n=3)
    op = NTKLinearOperator(model, list(model.parameters()), X)
    K = to_dense(op)
    v = torch.randn(9, dtype=F64)
    x = CGInverseLinearOperator(op, tolerance=1e-12, max_iter=200) @ v
    assert torch.allclose(K @ x, v, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- curvlinops' own
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_curvlinops_ggn_hessian_and_kfac_run_on_revmlp(loss):
    model, X, y, lossf = make_problem(9, "tanh", loss, n=4)
    params = list(model.parameters())
    data = [(X, y)]
    H_ref, G_ref = dense_hessian_ggn(model, X, y, lossf)
    assert torch.allclose(to_dense(HessianLinearOperator(model, lossf, params, data)), H_ref,
                          rtol=0, atol=TOL)
    assert torch.allclose(to_dense(GGNLinearOperator(model, lossf, params, data)), G_ref,
                          rtol=0, atol=TOL)
    K = KFACLinearOperator(model, lossf, params, data, fisher_type="type-2")
    Kd = to_dense(K)
    inner = {f"blocks.{i}.{h}.linear" for i in range(len(model.blocks)) for h in "fg"}
    assert set(K._input_covariances) == inner  # KFAC hooks the inner nn.Linear layers
    assert torch.allclose(Kd, Kd.T, atol=1e-12) and torch.linalg.eigvalsh(Kd).min() > -1e-10
    # KFAC's bias blocks are exact (A = 1): they equal the GGN's bias diagonal blocks
    names = [n for n, _ in model.named_parameters()]
    offsets = np.cumsum([0] + [p.numel() for p in params])
    for i, name in enumerate(names):
        if name.endswith("bias"):
            s = slice(offsets[i], offsets[i + 1])
            assert torch.allclose(Kd[s, s], G_ref[s, s], rtol=0, atol=TOL)
