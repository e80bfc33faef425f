"""Cockpit (cockpit-for-pytorch 1.0.2) on RevMLP after ``hosts.backpack.enable()``, and gnrev's
Cockpit quantities against dense float64 oracles.

Oracles (no BackPACK, no Cockpit, no gnrev metrics): ``torch.func.hessian`` of the flat-parameter
loss, dense Jacobians ``J`` from ``jacrev`` (``oracles.dense_jacobian``, rows sample-major),
per-sample gradients by ``vmap(grad)``, ``torch.linalg.matrix_rank`` of the design matrices
``[s, 1]``, NumPy cosines and NumPy linear CKA (centred Gram matrices). All on an un-extended twin
of the trained model (``load_state_dict``), never on the extended one. Tolerance 1e-10 in
float64 unless stated.

Under ``CI`` a missing Cockpit fails (``conftest.py`` turns the skip into a failure).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

cockpit = pytest.importorskip(
    "cockpit", reason="cockpit-for-pytorch is not installed: pip install 'gnrev-plugin[cockpit]'")

from backpack import extend  # noqa: E402
from backpack.context import CTX  # noqa: E402
from cockpit import Cockpit  # noqa: E402
from cockpit.plotter import CockpitPlotter  # noqa: E402
from cockpit.utils.configuration import configuration, quantities_cls_for_configuration  # noqa: E402
from oracles import dense_jacobian, flat_params  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, hessian, vmap  # noqa: E402

from gnrev_plugin.hosts import backpack as bp_host  # noqa: E402
from gnrev_plugin.hosts.cockpit import (  # noqa: E402
    CKAToInit,
    GNStepExactness,
    NMETrace,
    NTKSimilarityToInit,
    gnrev_quantities,
    plot,
)
from gnrev_plugin.nn import RevMLP  # noqa: E402
from gnrev_plugin.optim import ExactGN  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]
TOL = 1e-10
F64 = torch.float64
FULL = [cls.__name__ for cls in quantities_cls_for_configuration("full")]
TWO_STEP = {"Alpha", "UpdateSize"}  # reported at t once iteration t + 1 has run
DOCS = Path(__file__).resolve().parents[2] / "docs" / "hosts" / "cockpit.md"


@pytest.fixture(autouse=True)
def _enabled():
    bp_host.enable()
    yield
    bp_host.disable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CTX.remove_hooks()


# ---------------------------------------------------------------------------------- helpers
def make(activation: str, seed: int = 0, d: int = 6, M: int = 8, L: int = 2, C: int = 3,
         dtype: torch.dtype = F64):
    """A RevMLP and an un-extended float64 twin that the oracles use."""
    model = RevMLP(d, M, L, C, activation=activation, linear_first_block=False, init_std=0.3,
                   seed=seed).to(dtype)
    twin = copy.deepcopy(model).double()
    return extend(model), twin


def sync(twin: RevMLP, model: RevMLP) -> RevMLP:
    twin.load_state_dict(model.state_dict())
    return twin


def batches(steps: int, n, d: int = 6, C: int = 3, seed: int = 0, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(seed)
    sizes = n if isinstance(n, list) else [n] * steps
    return [(torch.randn(k, d, generator=g, dtype=F64).to(dtype),
             torch.randint(0, C, (k,), generator=g)) for k in sizes]


def train(model, opt, data, quantities, extra_info=None, explicit: bool = False):
    """The plain Cockpit loop of Cockpit's README, with ``model`` and ``opt`` as given
    (``explicit``: ExactGN steps with ``step_on_batch(X, y)`` on the batch Cockpit just saw, the
    same update as the drop-in ``opt.step()``)."""
    loss_fn = extend(nn.CrossEntropyLoss())
    per_sample = nn.CrossEntropyLoss(reduction="none")
    cp = Cockpit(model.parameters(), quantities=quantities)
    params = []
    for step, (X, y) in enumerate(data):  # params: float64 copies of θ_t
        params.append(flat_params(model))
        opt.zero_grad()
        out = model(X)
        loss = loss_fn(out, y)
        info = {"batch_size": X.shape[0], "individual_losses": per_sample(out, y), "loss": loss,
                "optimizer": opt, **(extra_info(X, y) if extra_info else {})}
        with cp(step, info=info):
            loss.backward(create_graph=cp.create_graph(step))
        if explicit:
            opt.step_on_batch(X, y)
        else:
            opt.step()
    params.append(flat_params(model))
    return cp, params


def finite(value) -> bool:
    if isinstance(value, dict):
        if value.get("defined", True) is False:
            return isinstance(value.get("reason"), str) and len(value["reason"]) > 20
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    if isinstance(value, str):
        return True
    return bool(np.all(np.isfinite(np.asarray(value, dtype=float))))


def assert_full_output(out: dict, steps: int) -> None:
    for step in range(steps):
        expected = set(FULL) - (TWO_STEP if step == steps - 1 else set())
        assert expected <= set(out[step]), f"step {step} lacks {expected - set(out[step])}"
        for key, value in out[step].items():
            assert finite(value), f"step {step}: {key} = {value!r}"


def flat_loss(twin: RevMLP, X, y, lossf=None):
    """``θ ↦ L(θ)`` on the flat parameter vector, and ``θ``."""
    lossf = lossf or nn.CrossEntropyLoss()
    names = [n for n, _ in twin.named_parameters()]
    ps = [p.detach() for p in twin.parameters()]
    sizes = [p.numel() for p in ps]

    def L(theta):
        d = {n: v.reshape(p.shape) for n, v, p in zip(names, theta.split(sizes), ps, strict=True)}
        return lossf(functional_call(twin, d, (X,)), y)
    return L, torch.cat([p.flatten() for p in ps]), sizes


def dense_nme_trace(twin: RevMLP, X, y) -> float:
    """``tr(H) − tr(G)``: ``H`` by ``torch.func.hessian``, ``G = Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n
    / N`` from the dense Jacobian (cross-entropy, mean reduction)."""
    L, theta, _ = flat_loss(twin, X, y)
    H = hessian(L)(theta)
    J = dense_jacobian(twin, X)
    with torch.no_grad():
        p = torch.softmax(twin(X), 1)
    N, C = p.shape
    G = sum(J[n * C:(n + 1) * C].T @ (torch.diag(p[n]) - torch.outer(p[n], p[n]))
            @ J[n * C:(n + 1) * C] for n in range(N)) / N
    return (H.trace() - G.trace()).item()


# ---------------------------------------------------------------------------------- acceptance
ACCEPTANCE = '''
import torch
from torch import nn
from backpack import extend
from cockpit import Cockpit
from cockpit.utils.configuration import configuration
from gnrev_plugin.hosts.backpack import enable
from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import ExactGN

enable()
model = extend(RevMLP(16, 32, 2, 4))
loss_fn = extend(nn.CrossEntropyLoss())
per_sample = nn.CrossEntropyLoss(reduction="none")
opt = ExactGN(model.parameters(), lr=0.5, loss="cross_entropy", rank_policy="warn")
cp = Cockpit(model.parameters(), quantities=configuration("full"))
X, y = torch.randn(12, 16), torch.randint(0, 4, (12,))
for step in range(3):
    opt.zero_grad()
    out = model(X)
    loss = loss_fn(out, y)
    with cp(step, info={"batch_size": 12, "individual_losses": per_sample(out, y), ''' \
    '''"loss": loss, "optimizer": opt}):
        loss.backward(create_graph=cp.create_graph(step))
    opt.step()
'''  # verbatim from the issue (its one long line is split in this file only)


def test_issue_acceptance_snippet_runs_with_every_full_quantity():
    bp_host.disable()  # the snippet's own enable() must be enough
    namespace: dict = {}
    exec(compile(ACCEPTANCE, "issue-15-acceptance", "exec"), namespace)
    out = namespace["cp"].get_output()
    assert sorted(out) == [0, 1, 2]
    assert_full_output(out, 3)


# ---------------------------------------------------------------------------------- full config
OPTIMIZERS = {
    "exactgn": lambda m: ExactGN(m.parameters(), lr=0.5, loss="cross_entropy",
                                 rank_policy="warn"),
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
}


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("optimizer", ["exactgn",
                                       "exactgn-explicit", "sgd", "adam"])
def test_full_configuration_runs_unchanged_and_matches_dense_oracles(optimizer, activation,
                                                                     tmp_path):
    """Cockpit's ``"full"`` configuration and its plotter on ``extend(RevMLP)``: every quantity at
    every step, finite; at step 0 its Hessian traces (``diag_h``), gradient norms and norm test
    (per-sample ``batch_l2`` through Cockpit's extension hook) equal the dense float64 oracles.
    In float32, since Cockpit's ``HessMaxEV`` multiplies float32 vectors: ``rtol = 1e-4``."""
    model, twin = make(activation, seed=1, dtype=torch.float32)
    data = batches(3, 6, seed=1, dtype=torch.float32)
    cp, _ = train(model, OPTIMIZERS[optimizer.split("-")[0]](model), data,
                  configuration("full") + gnrev_quantities(model, data[0][0]),
                  explicit=optimizer.endswith("explicit"))
    out = cp.get_output()
    assert_full_output(out, 3)
    assert {"GNStepExactness", "NMETrace", "NTKSimilarityToInit", "CKAToInit"} <= set(out[0])

    X, y = data[0][0].double(), data[0][1]
    L, theta, sizes = flat_loss(twin, X, y)  # twin still holds θ₀
    H = hessian(L)(theta)
    per_param = [c.sum().item() for c in H.diag().split(sizes)]
    assert np.allclose(out[0]["HessTrace"], per_param, rtol=1e-4, atol=1e-6)
    g = torch.func.grad(L)(theta)
    assert np.allclose(out[0]["GradNorm"], [c.norm().item() for c in g.split(sizes)],
                       rtol=1e-4, atol=1e-7)
    B = X.shape[0]
    G = vmap(grad(lambda th, x, t: _sample_loss(twin, th, x, t, sizes)),
             in_dims=(None, 0, 0))(theta, X, y)  # unscaled per-sample gradients ĝ_n
    norm_test = math.sqrt((G - g).pow(2).sum().item() / (B * (B - 1))) / g.norm().item()
    assert out[0]["NormTest"] == pytest.approx(norm_test, rel=1e-4)

    CockpitPlotter().plot(cp, show_plot=False, save_plot=True, savedir=str(tmp_path),
                          savename="cockpit")
    assert (tmp_path / "cockpit__primary.png").stat().st_size > 10_000


def _sample_loss(twin, theta, x, t, sizes):
    names = [n for n, _ in twin.named_parameters()]
    ps = [p.detach() for p in twin.parameters()]
    d = {n: v.reshape(p.shape) for n, v, p in zip(names, theta.split(sizes), ps, strict=True)}
    return nn.functional.cross_entropy(functional_call(twin, d, (x[None],)), t[None])


# ---------------------------------------------------------------------------------- tr(NME)
@pytest.mark.parametrize("activation", ["gelu", "tanh", "relu"])
def test_nme_trace_backpack_matches_dense_hessian_minus_ggn(activation):
    model, twin = make(activation, seed=2)
    data = batches(2, 5, seed=2)
    cp, params = train(model, torch.optim.SGD(model.parameters(), lr=0.2), data,
                       [NMETrace()])
    out = cp.get_output()
    for step, (X, y) in enumerate(data):
        torch.nn.utils.vector_to_parameters(params[step], twin.parameters())
        ref = dense_nme_trace(twin, X, y)
        assert abs(out[step]["NMETrace"] - ref) <= TOL
        if activation == "relu":
            assert ref == pytest.approx(0.0, abs=1e-12)  # ReLU: the NME has no diagonal
        else:
            assert abs(ref) > 1e-4


def test_nme_trace_curvlinops_matches_dense_hessian_minus_ggn():
    model, twin = make("gelu", seed=3)
    data = batches(2, 5, seed=3)
    q = NMETrace(method="curvlinops", model=model, loss_fn=nn.CrossEntropyLoss())
    cp, params = train(model, torch.optim.SGD(model.parameters(), lr=0.2), data, [q],
                       extra_info=lambda X, y: {"inputs": X, "targets": y})
    out = cp.get_output()
    for step, (X, y) in enumerate(data):
        torch.nn.utils.vector_to_parameters(params[step], twin.parameters())
        assert abs(out[step]["NMETrace"] - dense_nme_trace(twin, X, y)) <= TOL
    with pytest.raises(ValueError, match="needs model="):
        NMETrace(method="curvlinops")


# ---------------------------------------------------------------------------------- GN step
def _design_ranks(twin: RevMLP, X) -> tuple[list[int], list[int]]:
    """``rank [s, 1]`` of every half-layer by ``torch.linalg.matrix_rank`` (an explicit forward
    pass written out here)."""
    rf, rg = [], []
    z = X
    with torch.no_grad():
        for b in twin.blocks:
            x1, x2 = z[:, :b.half], z[:, b.half:]
            s_f = b.f.activation(x2 @ b.f.projection)
            y1 = x1 + s_f @ b.f.linear.weight.T + b.f.linear.bias
            s_g = b.g.activation(y1 @ b.g.projection)
            y2 = x2 + s_g @ b.g.linear.weight.T + b.g.linear.bias
            ones = torch.ones(len(X), 1, dtype=X.dtype)
            rf.append(int(torch.linalg.matrix_rank(torch.cat([s_f, ones], 1))))
            rg.append(int(torch.linalg.matrix_rank(torch.cat([s_g, ones], 1))))
            z = torch.cat([y1, y2], 1)
    return rf, rg


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("M,sizes", [(16, [4, 5, 7, 6]), (4, [8, 9, 10, 8])])
def test_gn_step_exactness_reports_each_step_against_dense_oracles(M, sizes, explicit):
    """Iteration ``t``'s value describes the step ``opt.step()`` took at ``t``: its ranks are
    those of that batch's design matrices, and its function-space residual is the dense
    ``‖J Δθ + α ε‖/‖α ε‖`` (``ε = softmax(F) − onehot(y)``) of that step. With ``M + 1 < n`` every
    system is rank-deficient and the step is reported inexact."""
    model, twin = make("tanh", seed=4, M=M)
    data = batches(3, sizes, seed=4)
    opt = ExactGN(model.parameters(), lr=0.5, loss="cross_entropy", rank_policy="warn",
                  verify=True)
    cp, params = train(model, opt, data, [GNStepExactness()], explicit=explicit)
    out = cp.get_output()
    assert "GNStepExactness" not in out[len(data) - 1]  # read at the next iteration, like Alpha
    for step, (X, y) in enumerate(data[:-1]):
        value = out[step]["GNStepExactness"]
        torch.nn.utils.vector_to_parameters(params[step], twin.parameters())
        J = dense_jacobian(twin, X)
        with torch.no_grad():
            eps = torch.softmax(twin(X), 1) - nn.functional.one_hot(y, 3).to(F64)
        T = -0.5 * eps.reshape(-1)
        dense = ((J @ (params[step + 1] - params[step]) - T).norm() / T.norm()).item()
        rf, rg = _design_ranks(twin, X)
        assert value["rank_f"] == rf and value["rank_g"] == rg
        assert value["n"] == [len(X)] * 2 and value["alpha"] == 0.5
        if min(rf + rg) == len(X):
            assert value["exact"] == 1.0 and value["role"] == ["exact share"] * 2
            assert dense <= TOL and value["relative_residual"] <= TOL
            assert value["max_residual"] <= TOL
        else:
            assert value["exact"] == 0.0 and dense > 1e-3
            assert value["relative_residual"] == pytest.approx(dense, rel=1e-8)


def test_gn_step_exactness_says_when_it_is_undefined():
    model, _ = make("relu", seed=5)
    cp, _ = train(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4, seed=5),
                  [GNStepExactness()])
    value = cp.get_output()[0]["GNStepExactness"]
    assert value["defined"] is False and "SGD, not gnrev's ExactGN" in value["reason"]
    assert GNStepExactness().should_compute(0) is False  # nothing taken before iteration 0


# ---------------------------------------------------------------------------------- NTK, CKA
def _np_cka(A: np.ndarray, B: np.ndarray) -> float:
    n = A.shape[0]
    Hc = np.eye(n) - np.ones((n, n)) / n
    K, L = Hc @ A @ A.T @ Hc, Hc @ B @ B.T @ Hc
    return float((K * L).sum() / math.sqrt((K * K).sum() * (L * L).sum()))


def test_ntk_similarity_and_cka_to_init_match_dense_oracles():
    model, twin = make("gelu", seed=6)
    probe = torch.randn(4, 6, generator=torch.Generator().manual_seed(60), dtype=F64)
    init = copy.deepcopy(twin)
    K0 = (lambda J: (J @ J.T).numpy())(dense_jacobian(init, probe))
    with torch.no_grad():
        Z0 = init.features(probe).numpy()
    data = batches(3, 6, seed=6)
    cp, params = train(model, torch.optim.Adam(model.parameters(), lr=0.05), data,
                       [NTKSimilarityToInit(model, probe), CKAToInit(model, probe)])
    out = cp.get_output()
    for step in range(3):
        torch.nn.utils.vector_to_parameters(params[step], twin.parameters())
        K = dense_jacobian(twin, probe).numpy()
        K = K @ K.T
        ntk = float((K0 * K).sum() / (np.linalg.norm(K0) * np.linalg.norm(K)))
        with torch.no_grad():
            Z = twin.features(probe).numpy()
        assert abs(out[step]["NTKSimilarityToInit"] - ntk) <= TOL
        assert abs(out[step]["CKAToInit"] - _np_cka(Z0, Z)) <= TOL
    assert out[2]["NTKSimilarityToInit"] < 1 - 1e-6 and out[2]["CKAToInit"] < 1 - 1e-8
    with pytest.raises(TypeError, match="needs a gnrev_plugin.nn.RevMLP"):
        CKAToInit(nn.Linear(6, 3).double(), probe)


# ---------------------------------------------------------------------------------- figure, docs
def test_plot_puts_gnrev_instruments_next_to_cockpit_s(tmp_path):
    model, _ = make("gelu", seed=7, dtype=torch.float32)
    data = batches(3, 6, seed=7, dtype=torch.float32)
    cp, _ = train(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                  configuration("full") + gnrev_quantities(model, data[0][0]))
    fig = plot(cp, str(tmp_path / "fig.png"))
    titles = [ax.get_title() for ax in fig.axes]
    assert any("tr(NME)" in t for t in titles) and any("NTK similarity" in t for t in titles)
    assert any("Hessian trace" in t or "Trace" in t for t in titles)  # Cockpit's own gauge
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    cp.write(str(tmp_path / "log"))  # the undefined GN step (SGD) is valid JSON
    assert '"defined": false' in (tmp_path / "log.json").read_text()


def test_docs_page_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert blocks
    namespace: dict = {"__name__": "docs_cockpit"}
    for block in blocks:
        exec(compile(block, "cockpit.md", "exec"), namespace)
    assert "NMETrace" in capsys.readouterr().out
