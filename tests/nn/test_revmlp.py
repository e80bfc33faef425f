"""RevMLP: exact inversion, block JVPs against torch.func, shapes, presets and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jvp

from gnrev_plugin.nn import PRESETS, RevMLP, revmlp_from_preset


@settings(max_examples=15, deadline=None)
@given(half=st.integers(1, 6), hidden=st.integers(1, 20), blocks=st.integers(1, 4),
       n=st.integers(1, 7), act=st.sampled_from(["relu", "tanh", "gelu", "identity", "sigmoid"]),
       lin=st.booleans(), seed=st.integers(0, 2**16))
def test_inverse_of_forward_is_identity(half, hidden, blocks, n, act, lin, seed):
    torch.manual_seed(seed)
    model = RevMLP(2 * half, hidden, blocks, None, activation=act, linear_first_block=lin,
                   init_std=0.5, seed=seed).double()
    x = torch.randn(n, 2 * half, dtype=torch.float64)
    with torch.no_grad():
        assert (model.inverse(model(x)) - x).abs().max() <= 1e-12
        assert (model(model.inverse(x)) - x).abs().max() <= 1e-12


def test_float32_inverse_is_accurate():
    model = RevMLP(10, 32, 3, None, init_std=0.1, seed=0)
    x = torch.randn(16, 10)
    with torch.no_grad():
        err = (model.inverse(model(x)) - x).abs().max() / x.abs().max()
    assert err < 1e-5


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "sigmoid", "softplus", "identity"])
def test_block_jvps_match_torch_func(act):
    torch.manual_seed(1)
    block = RevMLP(8, 12, 1, None, activation=act, linear_first_block=False, init_std=0.4,
                   seed=2).double().blocks[0]
    x = torch.randn(5, 8, dtype=torch.float64)
    v = torch.randn(5, 8, dtype=torch.float64)
    _, acts = block.forward_with_activations(x)
    _, ref = jvp(block, (x,), (v,))
    assert torch.allclose(block.jvp_input(acts, v), ref, rtol=0, atol=1e-12)
    # the inverse JVP undoes the JVP: J_block · inverse_jvp(t) = t
    t = torch.randn(5, 8, dtype=torch.float64)
    assert torch.allclose(block.jvp_input(acts, block.inverse_jvp_input(acts, t)), t, atol=1e-12)


def test_shapes_readout_and_parameter_count():
    model = revmlp_from_preset("mnist_paper")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 12_545_568  # 2 blocks × 2 half-layers × (392·8000 + 392)
    assert model.readout.shape == (784, 10)
    assert torch.allclose(model.readout.T @ model.readout, torch.eye(10), atol=1e-6)
    assert all(not b.requires_grad for b in model.buffers())
    cifar = PRESETS["cifar10_paper"]
    per_block = 2 * (cifar["in_features"] // 2 * cifar["hidden"] + cifar["in_features"] // 2)
    assert per_block * cifar["num_blocks"] == 147_474_432


def test_images_are_flattened_and_linear_first_block():
    model = RevMLP(16, 8, 2, 3, seed=0)
    out = model(torch.randn(4, 1, 4, 4))
    assert out.shape == (4, 3)
    assert model.blocks[0].f.activation.is_linear and not model.blocks[1].f.activation.is_linear


def test_same_seed_same_model_and_dtype_option():
    a, b = RevMLP(8, 6, 2, 2, seed=5), RevMLP(8, 6, 2, 2, seed=5)
    assert all(torch.equal(p, q) for p, q in
               zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    c = RevMLP(8, 6, 2, 2, seed=5, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in c.state_dict().values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_features=7, hidden=4, num_blocks=1), "even"),
    (dict(in_features=8, hidden=0, num_blocks=1), "≥ 1"),
    (dict(in_features=8, hidden=4, num_blocks=1, num_classes=9), "num_classes"),
    (dict(in_features=8, hidden=4, num_blocks=1, activation="swishy"), "unknown activation"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RevMLP(**kwargs)


def test_bad_inputs_are_named():
    model = RevMLP(8, 4, 1, 2, seed=0)
    with pytest.raises(ValueError, match="in_features=8"):
        model(torch.randn(3, 6))
    with pytest.raises(ValueError, match="batch"):
        model(torch.randn(8))
    with pytest.raises(ValueError, match="logits cannot be inverted"):
        model.inverse(torch.randn(3, 2))
    with pytest.raises(ValueError, match="unknown RevMLP preset"):
        revmlp_from_preset("nope")


@pytest.mark.parametrize("x, message", [(torch.zeros(0, 6), "empty batch"),
                                        (torch.zeros(3, 6, dtype=torch.long), "floating-point")])
def test_bad_inputs_are_clear_errors_before_the_forward(x, message):
    """The drop-in loop calls ``model(x)`` before the optimizer sees the batch."""
    model = RevMLP(in_features=6, hidden=8, num_blocks=2, num_classes=3, seed=0)
    with pytest.raises(ValueError, match=message):
        model(x)
