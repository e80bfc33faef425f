"""Structured per-layer Grams (``gnrev_plugin.optim.gram``) equal ``J Jᵀ`` of ``torch.func.jacrev``.

The oracle differentiates the whole network with ``jacrev`` (float64) and forms ``J Jᵀ``; the
package's Gram comes from unfolded patches / normalised inputs and output-VJPs, by both strategies
(per-sample gradients, chunked under a tiny memory budget too, and the patch Gram), at 1e-10. The
diagonal and the per-sample ``C × C`` blocks (CG's preconditioners) against those of the oracle.
"""

import pytest
import torch
from oracles import dense_jacobian
from torch import nn

from gnrev_plugin.optim.gram import (
    choose_strategy,
    factored_diagonal,
    factored_gram,
    factored_sample_blocks,
)
from gnrev_plugin.optim.gram.capture import capture_factors, plan_layers

TOL = 1e-10

CONV_CASES = {
    "stride_padding": dict(stride=2, padding=1),
    "dilation": dict(dilation=2, padding=2),
    "groups_no_bias": dict(groups=2, bias=False),
    "same_reflect": dict(padding="same", padding_mode="reflect"),
    "mixed": dict(stride=(2, 1), padding=(0, 1), dilation=(1, 2), groups=2),
}


class ConvNormNet(nn.Module):
    """conv (case) → norm → tanh → conv (3×2, no bias) → tanh → linear head."""

    def __init__(self, conv_kwargs: dict, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, **conv_kwargs)
        self.norm = {"group": nn.GroupNorm(2, 4), "batch_eval": nn.BatchNorm2d(4),
                     "none": nn.Identity()}[norm]
        self.conv2 = nn.Conv2d(4, 2, (3, 2), bias=False)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        h = self.conv2(torch.tanh(self.norm(self.conv1(x))))
        return self.head(torch.tanh(h).flatten(1))


def conv_net(case: str, norm: str = "group", seed: int = 0):
    torch.manual_seed(seed)
    net = ConvNormNet(CONV_CASES[case], norm)
    net(torch.zeros(1, 2, 9, 8))                      # materialise the lazy head
    if norm == "batch_eval":                          # random running statistics and affine
        net.norm.running_mean.uniform_(-1, 1)
        net.norm.running_var.uniform_(0.5, 2.0)
        net.norm.weight.data.uniform_(0.5, 1.5)
        net.norm.bias.data.uniform_(-0.5, 0.5)
        net.norm.eval()
    return net.double()


def sequence_net(seed: int = 0):
    """Linear on 3-D inputs and LayerNorm over the last two dims (T > 1 for both)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm([3, 4]), nn.Tanh(), nn.Flatten(),
                         nn.Linear(12, 3)).double()


def structured_gram(net, x, strategy=None, max_memory_mb=1024.0):
    names = [n for n, _ in net.named_parameters()]
    layers, generic = plan_layers(net, names)
    assert not generic
    params = {n: p.detach().clone() for n, p in net.named_parameters()}

    def f(trained, inp):
        return torch.func.functional_call(net, trained, (inp,))
    _, factors, _ = capture_factors(f, params, x, layers)
    K = sum(factored_gram(fa, strategy, max_memory_mb)[0] for fa in factors)
    d = sum(factored_diagonal(fa, strategy, max_memory_mb) for fa in factors)
    blocks = sum(factored_sample_blocks(fa, strategy, max_memory_mb) for fa in factors)
    return K, d, blocks


def check_against(ref, K, d, blocks):
    """Gram, diagonal and per-sample C×C blocks against the oracle's J Jᵀ (1e-10)."""
    n = blocks.shape[0]
    C = ref.shape[0] // n
    ref_blocks = torch.stack([ref[i * C:(i + 1) * C, i * C:(i + 1) * C] for i in range(n)])
    assert float((K - ref).norm() / ref.norm()) <= TOL
    assert float((d - ref.diagonal()).norm() / ref.diagonal().norm()) <= TOL
    assert float((blocks - ref_blocks).norm() / ref_blocks.norm()) <= TOL


@pytest.mark.parametrize("strategy", ["per_sample_grad", "patch_gram", None])
@pytest.mark.parametrize("norm", ["group", "batch_eval"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_norm_gram_equals_jacrev(case, norm, strategy):
    net = conv_net(case, norm)
    x = torch.randn(5, 2, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J = dense_jacobian(net, x)
    ref = J @ J.mT
    check_against(ref, *structured_gram(net, x, strategy))


@pytest.mark.parametrize("strategy", ["per_sample_grad", "patch_gram"])
def test_linear_on_sequences_and_layer_norm(strategy):
    net = sequence_net()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    J = dense_jacobian(net, x)
    ref = J @ J.mT
    check_against(ref, *structured_gram(net, x, strategy))


def test_chunked_per_sample_gram_under_a_small_budget():
    """A budget of a few kB forces one-sample chunks and the mirrored off-diagonal blocks."""
    net = conv_net("mixed")
    x = torch.randn(6, 2, 9, 8, dtype=torch.float64)
    J = dense_jacobian(net, x)
    ref = J @ J.mT
    check_against(ref, *structured_gram(net, x, "per_sample_grad", max_memory_mb=2e-3))


def test_strategy_follows_the_shapes():
    """Linear (one position) takes the patch Gram; a conv with many positions per-sample
    gradients (the cost model of gram.factored)."""
    from gnrev_plugin.optim.gram.factored import LayerFactors
    lin = LayerFactors(torch.zeros(8, 1, 1, 101), torch.zeros(8, 10, 1, 50, 1))
    conv = LayerFactors(torch.zeros(8, 1, 196, 26), torch.zeros(8, 10, 1, 32, 196))
    assert choose_strategy(lin) == "patch_gram"
    assert choose_strategy(conv) == "per_sample_grad"
