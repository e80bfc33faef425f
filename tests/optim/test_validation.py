"""One input-validation layer (:mod:`gnrev_plugin.optim.validation`, issue 22) for DenseGN and the
sharpness wrappers: a wrong dtype, a wrong output width, labels out of range, an empty batch and
non-finite values are named before any work, and the parameters are left unchanged. (Valid input
is untouched: the oracle tests of tests/optim/ stay bit-identical.)"""

from __future__ import annotations

import pytest
import torch

from gnrev_plugin.nn import MLP
from gnrev_plugin.optim import PSAM, SAM, DenseGN, GNTracePenalty, NonFiniteError, WeightNoise

DT = torch.float64


def problem(n=6, seed=0, dropout=False):
    torch.manual_seed(seed)
    model = MLP(in_features=4, num_classes=3, hidden=[5], activation="tanh", dtype=DT)
    if dropout:
        model = torch.nn.Sequential(torch.nn.Dropout(0.3), model)
    return model, torch.randn(n, 4, dtype=DT), torch.randint(0, 3, (n,))


def dense(model, loss="cross_entropy"):
    return DenseGN(model.parameters(), lr=0.5, model=model, loss=loss, rank_policy="warn")


OPTIMIZERS = {
    "DenseGN": dense,
    "SAM": lambda m, loss="cross_entropy": SAM(m.parameters(), model=m, loss=loss),
    "PSAM": lambda m, loss="cross_entropy": PSAM(m.parameters(), model=m, loss=loss),
    "WeightNoise": lambda m, loss="cross_entropy": WeightNoise(m.parameters(), model=m, loss=loss),
    "GNTracePenalty": lambda m, loss="cross_entropy": GNTracePenalty(m.parameters(), model=m,
                                                                     loss=loss),
}


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def bad_batches(x, y):
    nan = x.clone()
    nan[1, 2] = float("nan")
    high = y.clone()
    high[0] = 7
    return {
        "wrong dtype": ((x.float(), y), ValueError, r"inputs are torch.float32 but the model's "
                                                    r"parameters are torch.float64"),
        "labels out of range": ((x, high), ValueError, r"class indices must lie in \[0, 3\) for "
                                                       r"a model with 3 outputs, got range \[\d, 7\]"),
        "empty batch": ((x[:0], y[:0]), ValueError, r"(\w+: )?empty batch|need a non-empty batch"),
        "non-finite inputs": ((nan, y), NonFiniteError, r"non-finite inputs.*parameters were "
                                                       r"not changed"),
        "integer inputs": ((x.long(), y), ValueError, r"inputs must be real floating point"),
    }


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(bad_batches(torch.zeros(2, 4), torch.zeros(2)).keys()))
def test_bad_batches_are_named_and_change_nothing(name, case):
    model, x, y = problem()
    opt = OPTIMIZERS[name](model)
    (bx, by), exc, match = bad_batches(x, y)[case]
    before = flat(model)
    with pytest.raises(exc, match=match if case == "empty batch" else f"{name}: {match}"):
        opt.step_on_batch(bx, by)
    assert torch.equal(flat(model), before)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_mse_targets_of_the_wrong_width_are_named(name):
    model, x, y = problem()
    opt = OPTIMIZERS[name](model, loss="mse")
    before = flat(model)
    with pytest.raises(ValueError, match=r"MSE targets must be floating point of the output's "
                                         r"shape \(6, 3\), got \(6, 5\)"):
        opt.step_on_batch(x, torch.zeros(6, 5, dtype=DT))
    assert torch.equal(flat(model), before)


def test_the_width_probe_changes_no_state():
    """The one-sample probe that reads the output width runs in eval mode, without grad, with the
    capture hooks suspended and torch's RNG forked: dropout draws, BatchNorm statistics, the
    training flag and a pending captured batch are all as before."""
    from gnrev_plugin.optim.validation import validate_batch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(4, 5, dtype=DT),
                                torch.nn.BatchNorm1d(5, dtype=DT), torch.nn.Linear(5, 3, dtype=DT))
    opt = dense(model)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    torch.nn.functional.cross_entropy(model(x), y).backward()     # captures this batch
    captured = opt._capture.batch
    stats = model[2].running_mean.clone(), model[2].num_batches_tracked.clone()
    rng = torch.random.get_rng_state()
    validate_batch("probe", model, x, y, "cross_entropy")
    assert torch.equal(torch.random.get_rng_state(), rng) and model.training
    assert torch.equal(model[2].running_mean, stats[0])
    assert torch.equal(model[2].num_batches_tracked, stats[1])
    assert opt._capture.batch is captured
