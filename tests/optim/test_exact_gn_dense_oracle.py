"""Δθ itself against a dense per-block oracle (issue #12, item 2).

``J Δθ = T`` does not pin Δθ: any right inverse, and any wrong split of the target between blocks
that still sums to ``T``, passes it. Here the update is compared entry by entry with the
exactness contract of ``docs/exact_gn.md`` rebuilt from dense float64 pieces only (never the
package's solvers, activations or JVPs):

* per block, the Jacobians of the block output ``[Y1, Y2]`` w.r.t. ``θ_f = (W_f, b_f)`` and
  ``θ_g = (W_g, b_g)`` by ``torch.func.jacrev`` of the block's forward;
* the readout pre-image ``E = T pinv(U)``; the pull-back ``E^(ℓ)_i = T_ℓ,i⁻¹ E_i`` with the tail
  Jacobian ``T_ℓ,i = ∂X^(L)_i/∂X^(ℓ+1)_i`` (``jacrev``, per sample, ``torch.linalg.solve``);
* the per-half-layer least-squares solves with ``torch.linalg.pinv``:
  ``Δ_f = pinv(J_{Y1,f}) (w E1)``, ``m = J_{Y2,f} Δ_f``, ``Δ_g = pinv(J_{Y2,g}) (w E2 − m)``
  (``pinv(J_{Y1,f}) = A_f⁺ ⊗ I``: the minimum-norm per-layer solution);
* shares: with every block full rank (or none), ``w = 1/|P|``; otherwise the rank-deficient blocks
  take their least-squares part of ``E/|P|``, its output effect ``Σ T_ℓ r_ℓ U`` (``r_ℓ`` = block
  Jacobian × their Δθ) is subtracted from ``T``, and the full-rank blocks share the rest equally.

The oracle's rank of a system is unambiguous by construction (singular values either below
1e-11·σ_max or above 1e-5·σ_max, asserted), so its ``pinv`` cut cannot disagree with the package's.
Tolerance: 1e-8 relative on Δθ (examples with κ(A Aᵀ) < 1e6; observed ~1e-13).
"""

from __future__ import annotations

import pytest
import torch
from oracles import dense_jacobian, flat_params, rel
from torch.func import functional_call, jacrev

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import ExactGN, exact_gn_direction

DT = torch.float64
TOL = 1e-8
ZERO, GAP = 1e-11, 1e-5      # oracle rank: σ < ZERO·σ_max is zero, every other σ > GAP·σ_max
FNAMES, GNAMES = ("f.linear.weight", "f.linear.bias"), ("g.linear.weight", "g.linear.bias")


def oracle_rank(A: torch.Tensor) -> int:
    s = torch.linalg.svdvals(A)
    zero = s <= ZERO * s[0]
    assert bool((zero | (s >= GAP * s[0])).all()), f"ambiguous numerical rank: {s}"
    return int((~zero).sum())


class DenseBlock:
    """Dense Jacobians of one block at its input ``x_in`` (n×d)."""

    def __init__(self, block, x_in: torch.Tensor):
        self.n, self.d = x_in.shape
        self.half = self.d // 2
        params = {k: v.detach() for k, v in block.named_parameters()}
        pf = {k: params[k] for k in FNAMES}
        pg = {k: params[k] for k in GNAMES}

        def out(pf_, pg_):
            return functional_call(block, {**pf_, **pg_}, (x_in,))

        jf, jg = jacrev(out, argnums=(0, 1))(pf, pg)
        nd = self.n * self.d
        self.Jf = torch.cat([jf[k].reshape(nd, -1) for k in FNAMES], 1)
        self.Jg = torch.cat([jg[k].reshape(nd, -1) for k in GNAMES], 1)
        self.shapes = [(k, params[k].shape) for k in (*FNAMES, *GNAMES)]
        first = (torch.arange(nd) % self.d) < self.half        # rows of Y1 (sample-major)
        self.r1, self.r2 = first, ~first
        assert self.Jg[self.r1].abs().max() == 0                # Y1 does not depend on θ_g
        self.rank_f = oracle_rank(self.Jf[self.r1])
        self.rank_g = oracle_rank(self.Jg[self.r2])
        self.full = self.rank_f == self.rank_g == self.n * self.half

    def solve(self, E: torch.Tensor, w: float):
        """(Δθ_f, Δθ_g) flat, and the achieved block-output change (n×d)."""
        e1 = (w * E[:, :self.half]).reshape(-1)
        e2 = (w * E[:, self.half:]).reshape(-1)
        df = torch.linalg.pinv(self.Jf[self.r1], rtol=ZERO * 10) @ e1
        m = self.Jf[self.r2] @ df                                      # missing Jacobian
        dg = torch.linalg.pinv(self.Jg[self.r2], rtol=ZERO * 10) @ (e2 - m)
        achieved = (self.Jf @ df + self.Jg @ dg).reshape(self.n, self.d)
        return df, dg, achieved


@torch.no_grad()   # jacrev still differentiates inside; the oracle's results carry no graph
def oracle_delta(model: RevMLP, x: torch.Tensor, T: torch.Tensor,
                 blocks: list[int] | None = None) -> tuple[torch.Tensor, list[bool]]:
    """Δθ in ``model.parameters()`` order (zeros for frozen blocks), and each block's full rank."""
    L = len(model.blocks)
    P = list(range(L)) if blocks is None else sorted(blocks)
    with torch.no_grad():
        xs = [x]
        for b in model.blocks:
            xs.append(b(xs[-1]))
    dense = [DenseBlock(b, xs[i]) for i, b in enumerate(model.blocks)]
    U = model.readout
    Upinv = None if U is None else torch.linalg.pinv(U)

    def tail_jacobians(ell):                       # ∂X^(L)_i / ∂X^(ℓ+1)_i, (n, d, d)
        def tail(z):
            z = z.unsqueeze(0)
            for b in model.blocks[ell + 1:]:
                z = b(z)
            return z.squeeze(0)
        return torch.stack([jacrev(tail)(xs[ell + 1][i]) for i in range(x.shape[0])])

    tails = {ell: tail_jacobians(ell) for ell in P}

    def pull_back(Tout, ell):                      # output target → E^(ℓ)
        E = Tout if U is None else Tout @ Upinv
        return torch.linalg.solve(tails[ell], E.unsqueeze(-1)).squeeze(-1)

    def to_output(ell, achieved):                  # block change → output change
        z = (tails[ell] @ achieved.unsqueeze(-1)).squeeze(-1)
        return z if U is None else z @ U

    full = [i for i in P if dense[i].full]
    deficient = [i for i in P if not dense[i].full]
    sol = {}
    if not full or not deficient:
        for i in P:
            sol[i] = dense[i].solve(pull_back(T, i), 1.0 / len(P))
    else:
        for i in deficient:
            sol[i] = dense[i].solve(pull_back(T, i), 1.0 / len(P))
        rest = T - sum(to_output(i, sol[i][2]) for i in deficient)
        for i in full:
            sol[i] = dense[i].solve(pull_back(rest, i), 1.0 / len(full))
    parts = []
    for i, db in enumerate(dense):
        if i in sol:
            df, dg, _ = sol[i]
        else:
            df = torch.zeros(db.Jf.shape[1], dtype=DT)
            dg = torch.zeros(db.Jg.shape[1], dtype=DT)
        parts += [df, dg]     # flat order of (W_f, b_f) then (W_g, b_g) = parameters() order
    return torch.cat(parts), [db.full for db in dense]


def make(L, C, lin, seed, act="tanh"):
    return RevMLP(8, 16, L, C, activation=act, linear_first_block=lin, init_std=0.4,
                  seed=seed).double()


def batch(n, seed, C):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 8, generator=g, dtype=DT),
            torch.randn(n, C or 8, generator=g, dtype=DT))


# (L, rank case) → model and batch. "deficient": a linear first block with n = 7 > d/2 + 1 = 5;
# for L = 1 that block is the only one (rank_policy="warn": the least-squares step).
CASES = [(L, rank) for L in (1, 2, 3) for rank in ("full", "deficient")]


@pytest.mark.parametrize("C", [3, None])
@pytest.mark.parametrize("L,rank", CASES)
def test_update_equals_dense_per_block_oracle(L, rank, C):
    seed = 10 * L + (rank == "deficient") + (C is None) * 100
    model = make(L, C, lin=(rank == "deficient"), seed=seed)
    x, T = batch(7 if rank == "deficient" else 6, seed, C)
    want, full = oracle_delta(model, x, T)
    if rank == "full":
        assert all(full)
    else:
        assert full == [False] + [True] * (L - 1)
    policy = "warn" if not any(full) else "raise"
    got = torch.cat([t.reshape(-1) for t in exact_gn_direction(model, x, T, rank_policy=policy)])
    assert rel(got, want) <= TOL
    J = dense_jacobian(model, x)
    if any(full):                                   # the contract: exact whenever one is full
        assert rel(J @ want, T.reshape(-1)) <= TOL
    else:                                           # least squares only: not a right inverse
        assert rel(J @ want, T.reshape(-1)) > 1e-3


def test_duplicated_samples_make_every_block_least_squares():
    """A repeated sample makes every block rank-deficient: all take w = 1/L of their LS part."""
    model = make(2, 3, lin=False, seed=5)
    x, T = batch(6, 5, 3)
    x[4] = x[1]
    want, full = oracle_delta(model, x, T)
    assert full == [False, False]
    got = torch.cat([t.reshape(-1) for t in exact_gn_direction(model, x, T, rank_policy="warn")])
    assert rel(got, want) <= TOL


def test_exact_gn_step_with_frozen_block_and_deficient_block_equals_oracle():
    """ExactGN.step_on_batch (MSE, α = 0.6) with block 1 frozen: Δθ = oracle(−α(F − Y)) on the
    participating blocks 0 (rank-deficient) and 2 (full rank), zeros on block 1."""
    model = make(3, 3, lin=True, seed=6)
    x, y = batch(7, 6, 3)
    F0 = model(x).detach()
    want, full = oracle_delta(model, x, -0.6 * (F0 - y), blocks=[0, 2])
    assert full == [False, True, True]
    params = [p for i in (0, 2) for p in model.blocks[i].parameters()]
    before = flat_params(model)
    opt = ExactGN(params, lr=0.6, loss="mse")
    opt.step_on_batch(x, y)
    assert rel(flat_params(model) - before, want) <= TOL
    assert [b["role"] for b in opt.last_step_info["blocks"]] == ["least squares", "exact share"]
    assert [b["block"] for b in opt.last_step_info["blocks"]] == [0, 2]
    assert [b["full_rank"] for b in opt.last_step_info["blocks"]] == [False, True]
