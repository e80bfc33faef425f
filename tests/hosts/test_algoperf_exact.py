"""AlgoPerf through ExactGN is exact Gauss-Newton, not only "the loss decreases" (issue #12, item 8).

Only the adapter's public submission functions are used (``init_optimizer_state``,
``update_params``) with a duck-typed workload that follows AlgoPerf's PyTorch ``model_fn`` /
``loss_fn`` contract. Oracle: ``J = ∂vec F/∂θ`` of a float64 RevMLP by ``torch.func.jacrev`` and
``ε`` from NumPy (``softmax − smoothed one-hot`` for cross-entropy, ``F − Y`` for MSE); one update
must satisfy ``J Δθ = −α ε`` to 1e-9 relative (observed ~1e-15).
"""

from __future__ import annotations

import enum

import pytest
import torch
import torch.nn.functional as F
from oracles import dense_jacobian, flat_params, oracle_ce_target, rel

from gnrev_plugin.hosts import algoperf as ap
from gnrev_plugin.nn import RevMLP

DT = torch.float64


class LossType(enum.Enum):  # AlgoPerf's spec.LossType (the adapter reads the names)
    SOFTMAX_CROSS_ENTROPY = 0
    SIGMOID_CROSS_ENTROPY = 1
    MEAN_SQUARED_ERROR = 2


class Workload:
    """AlgoPerf's PyTorch workload contract: ``model_fn`` runs the module, ``loss_fn`` returns
    per-example losses summed with the count of valid examples."""

    def __init__(self, loss_type):
        self.loss_type = loss_type

    def model_fn(self, params, augmented_and_preprocessed_input_batch, model_state, mode, rng,
                 update_batch_norm, dropout_rate=None):
        return params(augmented_and_preprocessed_input_batch["inputs"]), model_state

    def loss_fn(self, label_batch, logits_batch, mask_batch=None, label_smoothing=0.0):
        if self.loss_type is LossType.MEAN_SQUARED_ERROR:
            per_example = F.mse_loss(logits_batch, label_batch, reduction="none").sum(1)
        else:
            per_example = F.cross_entropy(logits_batch, label_batch, reduction="none",
                                          label_smoothing=label_smoothing)
        return {"summed": per_example.sum(), "n_valid_examples": torch.as_tensor(len(per_example)),
                "per_example": per_example}


def revmlp(seed, lin=False):
    return RevMLP(8, 16, 2, 3, activation="tanh", linear_first_block=lin, init_std=0.3,
                  seed=seed).double()


def one_update(model, batch, loss_type, hps, optimizer="gnrev.exact_gn"):
    workload = Workload(loss_type)
    state = ap.init_optimizer_state(workload, model, None, hps, rng=None, optimizer=optimizer)
    assert type(state["optimizer"]).__name__ == {"gnrev.exact_gn": "ExactGN",
                                                  "gnrev.dense_gn": "DenseGN"}[optimizer]
    ap.update_params(workload, model, None, None, hps, batch, loss_type, state, [], 0, None)


@pytest.mark.parametrize("optimizer", ["gnrev.exact_gn", "gnrev.dense_gn"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("lin,n", [(False, 5), (True, 7)])
def test_cross_entropy_update_is_exact_gauss_newton(smoothing, lin, n, optimizer):
    """``lin``: a linear first block with n = 7 > d/2 + 1 (rank-deficient, redistributed)."""
    alpha = 0.3
    model = revmlp(seed=3 + lin, lin=lin)
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 8, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
    J, F0 = dense_jacobian(model, x), model(x).detach()
    eps = oracle_ce_target(F0, y, "identity", smoothing=smoothing)
    before = flat_params(model)
    one_update(model, {"inputs": x, "targets": y}, LossType.SOFTMAX_CROSS_ENTROPY,
               {"learning_rate": alpha, "label_smoothing": smoothing}, optimizer)
    assert rel(J @ (flat_params(model) - before), -alpha * eps.reshape(-1)) <= 1e-9


def test_mse_update_is_exact_gauss_newton():
    alpha = 0.4
    model = revmlp(seed=5)
    g = torch.Generator().manual_seed(5)
    x, Y = torch.randn(5, 8, generator=g, dtype=DT), torch.randn(5, 3, generator=g, dtype=DT)
    J, F0 = dense_jacobian(model, x), model(x).detach()
    before = flat_params(model)
    one_update(model, {"inputs": x, "targets": Y}, LossType.MEAN_SQUARED_ERROR,
               {"learning_rate": alpha})
    assert rel(J @ (flat_params(model) - before), -alpha * (F0 - Y).reshape(-1)) <= 1e-9
