"""The registered run metrics against dense float64 oracles that share no code with them
(``torch.func.jacrev``/``hessian`` Jacobians and Hessians, NumPy formulas), through the registry
and the runners' call (``evaluate_run_metrics``). Tolerance: 1e-10 relative (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from gnrev_plugin.build import RunSpec, build, evaluate_run_metrics

pytestmark = pytest.mark.usefixtures("_float64")


@pytest.fixture
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _built(model, metrics, **kw):
    spec = RunSpec(model=model, metrics=metrics, optimizer="sgd", optimizer_kwargs=dict(lr=0.3),
                   seed=3, **kw)
    return build(spec, in_features=6, num_classes=3)


def _jacobian(model, X):
    params = {k: v.detach() for k, v in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (X,)))(params)
    return torch.cat([J[k].reshape(X.shape[0] * 3, -1) for k in params], dim=1)  # (nC, P)


def _train(b, X, y, steps=5):
    for _ in range(steps):
        b.optimizer.zero_grad()
        b.loss_fn(b.model(X), y).backward()
        b.optimizer.step()


@pytest.mark.parametrize("model, kwargs", [("mlp", dict(hidden=[5], activation="tanh")),
                                           ("revmlp", dict(hidden=7, init_std=0.3))])
def test_run_metrics_equal_their_dense_definitions(model, kwargs):
    b = _built(model, ["ntk_similarity_to_init", "weight_cosine_to_init",
                       "weight_norm_ratio_to_init", "cka_to_init",
                       "gn_condition_number_on_batch"], model_kwargs=kwargs)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    _train(b, X, y)
    row = evaluate_run_metrics(b.metrics, b.model, inputs=X, targets=y, loss_fn=b.loss_fn,
                               initial_model=b.initial_model)
    # NTK similarity: Frobenius cosine of J0 J0ᵀ and J Jᵀ
    K0 = _jacobian(b.initial_model, X) @ _jacobian(b.initial_model, X).T
    K = _jacobian(b.model, X) @ _jacobian(b.model, X).T
    ref = float((K0 * K).sum() / (K0.norm() * K.norm()))
    assert row["gnrev.ntk_similarity_to_init"] == pytest.approx(ref, rel=1e-10)
    assert ref < 1 - 1e-6  # the model moved: the check can fail
    # weights: cosine and norm ratio of the concatenated parameter vectors (NumPy)
    w0 = np.concatenate([p.detach().numpy().ravel() for p in b.initial_model.parameters()])
    w = np.concatenate([p.detach().numpy().ravel() for p in b.model.parameters()])
    assert row["gnrev.weight_cosine_to_init"] == pytest.approx(
        w0 @ w / np.linalg.norm(w0) / np.linalg.norm(w), rel=1e-10)
    assert row["gnrev.weight_norm_ratio_to_init"] == pytest.approx(
        np.linalg.norm(w) / np.linalg.norm(w0), rel=1e-10)
    # CKA of every representation: ‖Y_cᵀ X_c‖²_F / (‖X_cᵀ X_c‖_F ‖Y_cᵀ Y_c‖_F), centred columns
    cka = {k: v for k, v in row.items() if k.startswith("gnrev.cka_to_init.")}
    assert cka and all(0 <= v <= 1 + 1e-12 for v in cka.values())
    if model == "mlp":
        reps = {}
        for which, net in (("0", b.initial_model), ("1", b.model)):
            h = torch.tanh(net[0](X)).detach().numpy()
            reps[which] = h - h.mean(0)
        a, c = reps["0"], reps["1"]
        ref_cka = np.linalg.norm(c.T @ a) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(c.T @ c))
        assert row["gnrev.cka_to_init.1"] == pytest.approx(ref_cka, rel=1e-10)
    # κ(G) on the Gram side: G = J Hℓ Jᵀ-side eigenvalues of the mean cross-entropy
    J = _jacobian(b.model, X).reshape(8, 3, -1)
    p = torch.softmax(b.model(X), 1).detach()
    H = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / 8  # per-sample ∂²ℓ/∂F²
    Gp = torch.einsum("icp,icd,idq->pq", J, H, J)                   # P × P GN matrix
    ev = torch.linalg.eigvalsh(Gp)
    kept = ev[ev > ev.max() * row_rtol(ev)]
    assert row["gnrev.gn_condition_number_on_batch.rank"] == len(kept)
    assert row["gnrev.gn_condition_number_on_batch.kappa"] == pytest.approx(
        float(kept.max() / kept.min()), rel=1e-6)


def row_rtol(ev: torch.Tensor) -> float:
    """The rank cut of gnrev's κ report: ``m · eps`` of the matrix side (here the nC Gram side,
    whose non-zero spectrum equals the P-side one)."""
    return 24 * torch.finfo(torch.float64).eps


def test_nme_trace_equals_trace_h_minus_trace_g():
    b = _built("mlp", ["nme_trace"], model_kwargs=dict(hidden=[4], activation="tanh"))
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    _train(b, X, y, steps=3)
    row = evaluate_run_metrics(b.metrics, b.model, inputs=X, targets=y, loss_fn=b.loss_fn,
                               initial_model=b.initial_model)
    params = {k: v.detach() for k, v in b.model.named_parameters()}
    names = list(params)

    def loss(*flat):
        out = functional_call(b.model, dict(zip(names, flat, strict=True)), (X,))
        return nn.functional.cross_entropy(out, y)

    Hb = hessian(loss, argnums=tuple(range(len(names))))(*params.values())
    tr_h = sum(float(Hb[i][i].reshape(params[k].numel(), -1).trace()) for i, k in enumerate(names))
    J = _jacobian(b.model, X).reshape(5, 3, -1)
    p = torch.softmax(b.model(X), 1).detach()
    Hl = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / 5
    tr_g = float(torch.einsum("icp,icd,idp->", J, Hl, J))
    assert abs(tr_h - tr_g) > 1e-6  # tanh: a non-zero NME, so the check can fail
    assert row["gnrev.nme_trace"] == pytest.approx(tr_h - tr_g, rel=1e-10)


def test_initial_kernel_is_recomputed_for_another_probe_batch():
    b = _built("mlp", ["ntk_similarity_to_init"], model_kwargs=dict(hidden=[5]))
    g = torch.Generator().manual_seed(2)
    X1, X2 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    y = torch.zeros(4, dtype=torch.long)
    _train(b, X1, y)
    for X in (X1, X2):
        row = evaluate_run_metrics(b.metrics, b.model, inputs=X, targets=y, loss_fn=b.loss_fn,
                                   initial_model=b.initial_model)
        K0 = _jacobian(b.initial_model, X) @ _jacobian(b.initial_model, X).T
        K = _jacobian(b.model, X) @ _jacobian(b.model, X).T
        ref = float((K0 * K).sum() / (K0.norm() * K.norm()))
        assert row["gnrev.ntk_similarity_to_init"] == pytest.approx(ref, rel=1e-10)
        assert math.isfinite(ref)
