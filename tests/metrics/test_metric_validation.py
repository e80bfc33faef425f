"""Metrics never return a silent NaN or 0.0 for bad input (issue 22): NaN inputs and empty batches
are a ``ValueError`` naming the metric and the problem (shared layer:
:mod:`gnrev_plugin.nn.validation`)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gnrev_plugin.metrics import (
    cka_to_init,
    gn_condition_number,
    linear_cka,
    nme_trace,
    ntk_similarity_to_init,
    random_probe_similarity,
    rbf_cka,
)
from gnrev_plugin.metrics.run_metrics import gn_condition_number_on_batch
from gnrev_plugin.nn import MLP

DT = torch.float64


def setup(n=6):
    torch.manual_seed(0)
    model = MLP(in_features=4, num_classes=3, hidden=[5], activation="tanh", dtype=DT)
    x = torch.randn(n, 4, dtype=DT)
    y = torch.randint(0, 3, (n,))
    return model, copy.deepcopy(model).eval(), x, y


def with_nan(x):
    x = x.clone()
    x[1, 0] = float("nan")
    return x


RUN_METRICS = {
    "ntk_similarity_to_init": ntk_similarity_to_init,
    "cka_to_init": cka_to_init,
    "nme_trace": nme_trace,
    "gn_condition_number_on_batch": gn_condition_number_on_batch,
}


@pytest.mark.parametrize("name", list(RUN_METRICS))
@pytest.mark.parametrize("bad", ["nan", "empty"])
def test_run_metrics_name_bad_probe_batches(name, bad):
    model, model0, x, y = setup()
    x, y = (with_nan(x), y) if bad == "nan" else (x[:0], y[:0])
    match = "non-finite value" if bad == "nan" else "empty batch"
    with pytest.raises(ValueError, match=f"{name}: (the inputs hold 1 {match}|{match})"):
        RUN_METRICS[name](model, inputs=x, targets=y, loss_fn=nn.CrossEntropyLoss(),
                          initial_model=model0)


@pytest.mark.parametrize("cka", [linear_cka, rbf_cka])
def test_cka_of_nan_representations_is_not_called_constant(cka):
    X = torch.randn(8, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"non-finite value") as err:
        cka(with_nan(X), X)
    assert "constant" not in str(err.value)
    with pytest.raises(ValueError, match="empty batch"):
        cka(X[:0], X[:0])


def test_gn_condition_number_names_bad_data_before_eigh():
    model, _, x, y = setup()
    with pytest.raises(ValueError, match=r"gn_condition_number: the inputs hold 1 non-finite"):
        gn_condition_number(model, nn.CrossEntropyLoss(), (with_nan(x), y))
    high = y.clone()
    high[0] = 9
    with pytest.raises(ValueError, match=r"gn_condition_number: class indices must lie in "
                                         r"\[0, 3\).*\[\d, 9\]"):
        gn_condition_number(model, nn.CrossEntropyLoss(), (x, high))
    with pytest.raises(ValueError, match=r"gn_condition_number: MSE targets .*\(6, 3\)"):
        gn_condition_number(model, nn.MSELoss(), (x, torch.zeros(6, 2, dtype=DT)))


def test_random_probe_similarity_of_an_empty_batch_is_an_error_not_zero():
    model, model0, x, _ = setup()
    with pytest.raises(ValueError, match="random_probe_similarity: empty batch"):
        random_probe_similarity(model, model0, x[:0], num_probes=3)
    with pytest.raises(ValueError, match="random_probe_similarity: the X hold 1 non-finite"):
        random_probe_similarity(model, model0, with_nan(x), num_probes=3)


def test_valid_input_gives_the_same_numbers():
    """The checks only read: a valid probe batch gives finite values, identical on a repeat."""
    model, model0, x, y = setup()
    kw = dict(inputs=x, targets=y, loss_fn=nn.CrossEntropyLoss(), initial_model=model0)
    for fn in RUN_METRICS.values():
        a, b = fn(model, **kw), fn(model, **kw)
        assert a == b
