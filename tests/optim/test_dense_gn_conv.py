"""DenseGN's structured step on conv / norm networks equals the Moore-Penrose step −α J⁺ε.

Oracle (float64, no package code): ``J`` by ``torch.func.jacrev`` of the whole network and the
step ``−α pinv(J) ε`` by ``torch.linalg.pinv``, at 1e-8. Covers stride, padding (zeros, "same" with
reflect), dilation, groups, bias/no bias, BatchNorm in eval mode, GroupNorm, LayerNorm, and
rank-deficient batches (duplicated samples); BatchNorm in training mode takes the batch Jacobian
with a recorded note.
"""

import pytest
import torch
from oracles import dense_jacobian, flat_params, oracle_ce_target, rel
from test_gram_structured import CONV_CASES, conv_net, sequence_net
from torch import nn

from gnrev_plugin.optim import DenseGN, RankDeficiencyError

TOL = 1e-8


def _batch(n, seed=0, shape=(2, 9, 8), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return x.to(device), torch.randint(0, 3, (n,), generator=g).to(device)


def _oracle_step(net, x, y, lr):
    J, F0 = dense_jacobian(net, x), net(x).detach()
    eps = oracle_ce_target(F0.cpu(), y.cpu(), "identity").to(x.device)
    return -lr * torch.linalg.pinv(J) @ eps.reshape(-1)


@pytest.mark.parametrize("norm", ["group", "batch_eval"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_step_is_moore_penrose(case, norm):
    net = conv_net(case, norm)
    x, y = _batch(5)
    expect = _oracle_step(net, x, y, 0.7)
    before = flat_params(net)
    opt = DenseGN(net.parameters(), model=net, lr=0.7, loss="cross_entropy")
    opt.step_on_batch(x, y)
    assert rel(flat_params(net) - before, expect) <= TOL
    assert opt.last_step_exact
    layers = opt.last_step_info["layers"]
    assert layers["conv1"].startswith("conv2d:") and layers["norm"].startswith("norm:")
    assert layers["head"] == "linear:patch_gram" and "note" not in opt.last_step_info


def test_layer_norm_and_sequence_linear_step():
    net = sequence_net(2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    expect = _oracle_step(net, x, y, 0.5)
    before = flat_params(net)
    opt = DenseGN(net.parameters(), model=net, lr=0.5, loss="cross_entropy")
    opt.step_on_batch(x, y)
    assert rel(flat_params(net) - before, expect) <= TOL
    assert opt.last_step_info["layers"]["1"].startswith("norm:")


def test_duplicated_samples_rank_deficient():
    """Duplicated samples make J Jᵀ singular: "raise" refuses, "warn" takes J⁺ε (1e-8)."""
    net = conv_net("dilation")
    x, y = _batch(4, seed=5)
    x, y = torch.cat([x, x[:2]]), torch.cat([y, y[:2]])
    with pytest.raises(RankDeficiencyError):
        DenseGN(net.parameters(), model=net, loss="cross_entropy").step_on_batch(x, y)
    expect = _oracle_step(net, x, y, 0.3)
    before = flat_params(net)
    opt = DenseGN(net.parameters(), model=net, lr=0.3, loss="cross_entropy", solver="eigh",
                  rank_policy="warn")
    with pytest.warns(RuntimeWarning, match="not exact"):
        opt.step_on_batch(x, y)
    assert rel(flat_params(net) - before, expect) <= TOL
    assert opt.last_step_info["rank"] == 4 * 3 and opt.last_step_exact is False


def test_batchnorm_training_mode_takes_the_batch_jacobian_and_says_so():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                        nn.Linear(3 * 7 * 6, 3)).double()
    oracle = nn.Sequential(*[m for m in net])        # same modules; BN without running stats
    x, y = _batch(4, seed=2)
    saved = (net[1].running_mean.clone(), net[1].running_var.clone())
    net[1].track_running_stats, net[1].running_mean, net[1].running_var = False, None, None
    expect = _oracle_step(oracle, x, y, 1.0)
    net[1].track_running_stats = True
    net[1].running_mean, net[1].running_var = saved
    before = flat_params(net)
    opt = DenseGN(net.parameters(), model=net, lr=1.0, loss="cross_entropy")
    opt.step_on_batch(x, y)
    assert rel(flat_params(net) - before, expect) <= TOL
    assert opt.last_step_info["jacobian"] == "rows"
    assert "couples the samples" in opt.last_step_info["note"]
    with pytest.raises(ValueError, match="couples the samples.*solver='cg'"):
        DenseGN(net.parameters(), model=net, max_jacobian_entries=100,
                loss="cross_entropy").step_on_batch(x, y)
    with pytest.raises(ValueError, match="independent samples"):
        DenseGN(net.parameters(), model=net, jacobian="structured",
                loss="cross_entropy").step_on_batch(x, y)


def test_layer_called_twice_is_refused():
    lin = nn.Linear(3, 3).double()
    net = nn.Sequential(lin, nn.Tanh(), lin).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="ran \\[2\\] times"):
        DenseGN(net.parameters(), model=net).step_on_batch(x, torch.randn(2, 3).double())


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["mixed", "same_reflect"])
def test_conv_step_is_moore_penrose_cuda(case):
    net = conv_net(case, "batch_eval").cuda()
    x, y = _batch(5, device="cuda")
    expect = _oracle_step(net, x, y, 0.7)
    before = flat_params(net)
    DenseGN(net.parameters(), model=net, lr=0.7, loss="cross_entropy").step_on_batch(x, y)
    assert rel(flat_params(net) - before, expect) <= TOL
