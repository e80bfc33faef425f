"""bfloat16 / float16 parameters with the default options: the step runs in ``factor_dtype``.

The new parameters must be ``θ + Δθ`` rounded once to the parameter dtype, where ``Δθ`` is the
exact Gauss-Newton step at the (exactly representable) low-precision parameters, computed by a
float64 oracle. Round-to-nearest gives, per entry, ``|fl(z) − z| ≤ u |z|`` with the unit
roundoff ``u = eps/2`` (bfloat16 ``2⁻⁸``, float16 ``2⁻¹¹``), plus half the subnormal spacing for
float16's tiny values. With ``factor_dtype=float32`` the computed ``Δθ`` itself carries an error,
bounded here by ``1e-3 · max|Δθ|`` (float32's ``residual_rtol``); with float64 by ``1e-9``.

Oracles: ExactGN — the float64 ExactGN step on a float64 copy (pinned against per-block
``torch.linalg.pinv`` solves in ``test_exact_gn_dense_oracle.py``), and independently
``J Δθ = −α ε`` with a ``torch.func`` Jacobian and NumPy's softmax target; DenseGN —
``Δθ = Jᵀ pinv(J Jᵀ)(−α ε)`` with the ``torch.func`` Jacobian (no package code).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from oracles import dense_jacobian, oracle_ce_target
from torch import nn

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import DenseGN, ExactGN

LOW = [torch.bfloat16, torch.float16]
FACTOR = [torch.float64, torch.float32]
LR = 0.7
D64 = torch.float64


def _step_error_bound(dtype: torch.dtype, factor: torch.dtype) -> float:
    return 1e-3 if factor == torch.float32 else 1e-9


def _check_rounded_once(new: list[torch.Tensor], old64: list[torch.Tensor],
                        delta64: list[torch.Tensor], dtype: torch.dtype,
                        factor: torch.dtype) -> None:
    """``|θ_new − (θ + Δθ)| ≤ u|θ + Δθ| + half subnormal spacing + Δθ's own error``."""
    fi = torch.finfo(dtype)
    u = fi.eps / 2
    dmax = max(float(d.abs().max()) for d in delta64)
    slack = _step_error_bound(dtype, factor) * dmax + fi.tiny * fi.eps / 2
    for i, (p, t, d) in enumerate(zip(new, old64, delta64, strict=True)):
        assert p.dtype == dtype
        z = t + d
        err = (p.to(D64) - z).abs()
        bound = u * z.abs() * (1 + 1e-12) + slack
        worst = float((err - bound).max())
        assert worst <= 0, f"parameter {i}: exceeds the rounding bound by {worst:.2e}"
    # the step is far above the rounding: a dropped update could not pass
    assert dmax > 50 * u * max(float(t.abs().max()) for t in old64)


def _revmlp(dtype):
    return RevMLP(16, 40, 2, num_classes=4, init_std=0.3, seed=3, dtype=dtype)


def _data(n=12, d=16, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=D64), torch.randint(0, c, (n,), generator=g)


@functools.cache
def _exact_gn_oracle(dtype: torch.dtype):
    """``(θ, Δθ)`` in float64 at the ``dtype`` model's values on the ``dtype``-rounded batch:
    ExactGN on a float64 copy, with ``J Δθ = −α ε`` checked by a dense torch.func Jacobian and
    NumPy's cross-entropy gradient."""
    x64, y = _data()
    x = x64.to(dtype).to(D64)
    m64 = _revmlp(D64)
    m64.load_state_dict(_revmlp(dtype).state_dict())  # exact: low-precision values are float64s
    old = [p.detach().clone() for p in m64.parameters()]
    J = dense_jacobian(m64, x)
    with torch.no_grad():
        eps = oracle_ce_target(m64(x), y, "identity")
    opt = ExactGN(m64.parameters(), lr=LR, loss="cross_entropy", rank_policy="warn", model=m64)
    opt.step_on_batch(x, y)
    opt.close()
    assert opt.last_step_exact
    delta = [p.detach() - t for p, t in zip(m64.parameters(), old, strict=True)]
    flat = torch.cat([d.reshape(-1) for d in delta])
    target = -LR * eps.reshape(-1)
    assert float((J @ flat - target).norm() / target.norm()) < 1e-9
    return old, delta


@pytest.mark.parametrize("factor", FACTOR)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("path", ["explicit", "drop-in"])
def test_exact_gn_low_precision_params_match_float64_oracle(dtype, factor, path):
    model = _revmlp(dtype)
    x64, y = _data()
    x = x64.to(dtype)
    old, delta = _exact_gn_oracle(dtype)
    opt = ExactGN(model.parameters(), lr=LR, loss="cross_entropy", rank_policy="warn",
                  factor_dtype=factor, model=model)
    if path == "explicit":
        opt.step_on_batch(x, y)
    else:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.last_step_exact
    _check_rounded_once([p.detach() for p in model.parameters()], old, delta, dtype, factor)


def _mlp(dtype):
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).to(dtype)


@pytest.mark.parametrize("factor", FACTOR)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("jacobian", ["auto", "per_sample"])
def test_dense_gn_low_precision_params_match_float64_oracle(dtype, factor, jacobian):
    model = _mlp(dtype)
    x = _data(8, 6, 3, seed=1)[0].to(dtype)
    old, delta = _dense_gn_oracle(dtype)
    opt = DenseGN(model.parameters(), lr=LR, loss="cross_entropy", factor_dtype=factor,
                  jacobian=jacobian, model=model)
    opt.step_on_batch(x, _data(8, 6, 3, seed=1)[1])
    assert opt.last_step_exact
    _check_rounded_once([p.detach() for p in model.parameters()], old, delta, dtype, factor)


@functools.cache
def _dense_gn_oracle(dtype: torch.dtype):
    """``(θ, Jᵀ pinv(J Jᵀ)(−α ε))`` in float64 at the ``dtype`` MLP's values (torch.func ``J``,
    NumPy's cross-entropy gradient)."""
    x64, y = _data(8, 6, 3, seed=1)
    x = x64.to(dtype)
    model = _mlp(dtype)
    m64 = _mlp(D64)
    m64.load_state_dict(model.state_dict())
    old = [p.detach().clone() for p in m64.parameters()]
    J = dense_jacobian(m64, x.to(D64))
    with torch.no_grad():
        eps = oracle_ce_target(m64(x.to(D64)), y, "identity")
    flat = J.mT @ (torch.linalg.pinv(J @ J.mT, hermitian=True) @ (-LR * eps.reshape(-1)))
    delta, i = [], 0
    for t in old:
        delta.append(flat[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return old, delta


def test_factor_dtype_is_a_param_group_hyperparameter():
    model = _revmlp(torch.bfloat16)
    opt = ExactGN(model.parameters(), factor_dtype=torch.float32)
    assert opt.param_groups[0]["factor_dtype"] == torch.float32
    mlp = _mlp(torch.bfloat16)
    dense = DenseGN(mlp.parameters(), factor_dtype=torch.float32)
    assert dense.state_dict()["param_groups"][0]["factor_dtype"] == torch.float32
    with pytest.raises(ValueError, match="factor_dtype"):
        DenseGN(mlp.parameters(), factor_dtype=torch.int32)
    # by name, as `gnrev train --opt factor_dtype=float32` passes it
    named = ExactGN(model.parameters(), factor_dtype="float32", model=model)
    assert named.param_groups[0]["factor_dtype"] == torch.float32
    with pytest.raises(ValueError, match="factor_dtype must be a torch dtype or its name"):
        ExactGN(model.parameters(), factor_dtype="float31", model=model)
