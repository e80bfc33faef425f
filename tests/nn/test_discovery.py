"""The one model-discovery mechanism of the drop-in optimizers (gnrev_plugin.nn.discovery)."""

import copy

import pytest
import torch
from torch import nn

from gnrev_plugin.nn import RevMLP, find_revmlp_owning
from gnrev_plugin.nn.discovery import find_module_owning
from gnrev_plugin.optim import DenseGN, ExactGN


def test_finds_the_owner_its_copies_and_prefers_the_outermost_wrapper():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    assert find_module_owning(net.parameters()) is net
    assert find_module_owning(net[0].parameters()) is net[0]  # the smallest owner
    twin = copy.deepcopy(net)
    assert find_module_owning(twin.parameters()) is twin
    wrapper = nn.Sequential(net)  # adds no parameters: the loop calls the wrapper's forward
    assert find_module_owning(net.parameters()) is wrapper
    assert DenseGN(net.parameters(), lr=1.0).model is wrapper


def test_ambiguous_or_unowned_parameters_ask_for_model():
    shared = nn.Linear(3, 2)
    a, b = nn.Sequential(shared), nn.Sequential(shared)  # two unrelated owners of one layer
    with pytest.raises(ValueError, match="2 live modules own all of the given parameters"):
        find_module_owning(a.parameters())
    with pytest.raises(ValueError, match="no live module owns"):
        find_module_owning([torch.zeros(2, requires_grad=True)])
    del a, b


def test_exact_gn_finds_its_revmlp_and_refuses_other_models():
    model = RevMLP(in_features=6, hidden=8, num_blocks=2, num_classes=3, seed=0)
    clone = copy.deepcopy(model)
    assert find_revmlp_owning(model.parameters()) is model
    assert find_revmlp_owning(clone.parameters()) is clone
    assert ExactGN(clone.parameters(), lr=1.0, loss="mse").model is clone
    mlp = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ValueError, match="no live RevMLP owns.*ExactGN needs the parameters"):
        ExactGN(mlp.parameters(), lr=1.0, loss="mse")
