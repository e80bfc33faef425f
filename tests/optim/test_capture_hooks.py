"""The drop-in GN step still finds its loss when the model carries a full backward hook (what
BackPACK's ``extend`` and therefore Cockpit install): the hook routes the output through an
autograd Function whose outputs are ``view_as`` aliases, and the loss is applied to the alias."""

import torch
from torch import nn

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import DenseGN, ExactGN


def _dropin_equals_explicit(make_opt, hook: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,))
    models = [RevMLP(8, 16, 2, 3, linear_first_block=False, init_std=0.3, seed=1).double()
              for _ in range(2)]
    if hook:
        models[0].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    opts = [make_opt(m) for m in models]
    opts[0].zero_grad()
    nn.functional.cross_entropy(models[0](x), y).backward()
    opts[0].step()
    opts[1].step_on_batch(x, y)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_exact_gn_dropin_through_a_full_backward_hook():
    for hook in (False, True):
        _dropin_equals_explicit(lambda m: ExactGN(m.parameters(), lr=0.5, loss="cross_entropy",
                                                  model=m), hook)


def test_dense_gn_dropin_through_a_full_backward_hook():
    _dropin_equals_explicit(lambda m: DenseGN(m.parameters(), lr=0.5, loss="cross_entropy",
                                              model=m), hook=True)
