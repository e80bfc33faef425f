"""The batch-step protocol and capabilities (``gnrev_plugin.optim.protocols``), the options that
live in ``param_groups``, and the core's independence from the registry."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import PSAM, SAM, DenseGN, ExactGN, GNTracePenalty, HessianTracePenalty, WeightNoise
from gnrev_plugin.optim.protocols import (
    BATCH_STEP,
    CAPABILITIES,
    DISTRIBUTED,
    GAUSS_NEWTON,
    BatchStepOptimizer,
    capabilities_of,
    is_distributed,
    is_gauss_newton,
    steps_on_batch,
)

REGULARIZERS = (SAM, PSAM, WeightNoise, HessianTracePenalty, GNTracePenalty)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("cls", [ExactGN, DenseGN])
def test_the_gauss_newton_family_declares_all_three_capabilities(cls):
    assert capabilities_of(cls) == {GAUSS_NEWTON, BATCH_STEP, DISTRIBUTED} == CAPABILITIES
    assert is_gauss_newton(cls) and steps_on_batch(cls) and is_distributed(cls)


@pytest.mark.parametrize("cls", REGULARIZERS)
def test_regularizers_step_on_batches_but_are_not_gauss_newton(cls):
    model = _mlp()
    opt = cls(model.parameters(), model=model, lr=0.1)
    assert capabilities_of(opt) == {BATCH_STEP}
    assert steps_on_batch(opt) and not is_gauss_newton(opt) and not is_distributed(opt)
    assert isinstance(opt, BatchStepOptimizer)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert torch.isfinite(opt.step_on_batch(x, y))


def test_every_declared_batch_step_optimizer_really_has_step_on_batch():
    rev = RevMLP(4, 8, 1, 3, dtype=torch.float64, seed=0)
    mlp = _mlp()
    for opt in (ExactGN(rev.parameters(), model=rev), DenseGN(mlp.parameters(), model=mlp)):
        assert steps_on_batch(opt) and callable(opt.step_on_batch)
        assert isinstance(opt, BatchStepOptimizer)


@pytest.mark.parametrize("cls", REGULARIZERS)
def test_the_registry_factories_declare_what_they_build(cls):
    import gnrev_plugin.registry.regularizer_entries as entries

    assert capabilities_of(getattr(entries, cls.__name__)) == capabilities_of(cls) == {BATCH_STEP}


def test_plain_torch_optimizers_declare_nothing():
    opt = torch.optim.SGD(_mlp().parameters(), lr=0.1)
    assert capabilities_of(opt) == frozenset() and capabilities_of(object()) == frozenset()
    assert not (steps_on_batch(opt) or is_gauss_newton(opt) or is_distributed(opt))
    assert not isinstance(opt, BatchStepOptimizer)


def test_a_batch_step_optimizer_is_refused_as_a_regularizers_base():
    model = _mlp()

    def base(groups, **kw):
        return DenseGN(groups, model=model, **kw)

    with pytest.raises(TypeError, match="steps from p.grad"):
        SAM(model.parameters(), model=model, base=base)


# ------------------------------------------------------------------ options in param_groups
def test_the_regularizers_loss_is_a_group_hyperparameter():
    model = _mlp()
    opt = PSAM(model.parameters(), model=model, loss="mse", lr=0.1)
    assert opt.param_groups[0]["loss"] == "mse" == opt.loss_kind
    opt.param_groups[0]["loss"] = "cross_entropy"          # the group is the one source
    assert opt.loss_kind == "cross_entropy"
    mixed = PSAM([{"params": list(model.parameters())[:2], "loss": "mse"},
                  {"params": list(model.parameters())[2:]}], model=model)
    with pytest.raises(ValueError, match="equal in every parameter group"):
        _ = mixed.loss_kind
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["loss"]                                        # a state dict from before
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["loss"] == "cross_entropy"   # the constructor's default


def test_dense_gn_max_jacobian_entries_is_a_group_hyperparameter():
    model = _mlp()
    opt = DenseGN(model.parameters(), model=model, max_jacobian_entries=1234, jacobian="rows")
    assert opt.param_groups[0]["max_jacobian_entries"] == 1234 == opt.max_jacobian_entries
    opt.param_groups[0]["max_jacobian_entries"] = 10
    x, y = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_jacobian_entries=10"):
        opt.step_on_batch(x, y)


# ------------------------------------------------------------------ layers
def test_the_core_never_imports_the_registry():
    code = ("import sys, torch; from torch import nn; import gnrev_plugin.optim as o; "
            "m = nn.Linear(3, 2).double(); "
            "o.SAM(m.parameters(), model=m, lr=0.1).step_on_batch("
            "torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])); "
            "print(sorted(k for k in sys.modules if k in ('gnrev_plugin.registry', "
            "'gnrev_plugin.build', 'gnrev_plugin.registry.builtin', 'pluggy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=300)
    assert out.stdout.split() == ["[]"]
