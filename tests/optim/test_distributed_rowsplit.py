"""The row-split distributed ExactGN solve (2 and 3 gloo ranks, float64) against one process.

:mod:`gnrev_plugin.optim.distributed_solve` splits every half-layer system by rows: each rank
forms its tiles of the dual Gram (or its ``B_rᵀB_r`` of the primal one), one owner per Gram
factors it, ``ΔW = Σ_r S_rᵀΛ_r`` is all-reduced and residuals are global. Each case runs one
ExactGN step on the ranks' contiguous shards of a global batch and must end with the parameters
of a single process on the whole batch (whose own dense float64 oracles are in
``test_exact_gn_dense_oracle.py``) to ``1e-9`` relative, bitwise the same on every rank, with the
same report. The batches (13 rows) do not split evenly over 2 or 3 ranks. The cases cover every
system kind: dual and primal Grams of ReLU blocks, the linear block's small side (``linear
dual``/``linear primal``), rank loss (duplicated rows on different ranks: pivoted QR on the
owner), the ``eigh`` and ``damped`` solvers, forced refinement and demotion
(``residual_rtol=1e-30``), two consecutive steps, MSE through the drop-in step, and ``svd``
(the root path). DenseGN (its Gram gathered and factored on rank 0) is checked the same way
for its Jacobian methods.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import DenseGN, ExactGN
from gnrev_plugin.optim.distributed import contiguous_shard
from gnrev_plugin.optim.distributed_solve import gram_tiles

RTOL = 1e-9
N = 13            # 7 + 6 rows on 2 ranks, 5 + 4 + 4 on 3


def _data(seed: int, n: int, d: int, c: int = 4, dup: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    if dup:                                   # the first row again as the last: other rank
        x[-1], y[-1] = x[0], y[0]
    return x, y


def _step(model_kw: dict, opt_kw: dict, data_kw: dict, rank=None, world=None, steps: int = 1,
          dropin_mse: bool = False) -> dict:
    model = RevMLP(dtype=torch.float64, seed=3, init_std=0.3, **model_kw)
    x, y = _data(**data_kw)
    if rank is not None:
        rows = contiguous_shard(len(x), rank, world)
        x, y = x[rows], y[rows]
    kw = dict(lr=0.7, loss="mse" if dropin_mse else "cross_entropy", rank_policy="warn",
              verify=True) | opt_kw
    opt = ExactGN(model.parameters(), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(steps):
            if dropin_mse:
                opt.zero_grad()
                F.mse_loss(model(x), F.one_hot(y, model_kw["num_classes"]).double()).backward()
                opt.step()
            else:
                opt.step_on_batch(x, y)
    return dict(params=[p.detach().clone() for p in model.parameters()],
                exact=opt.last_step_exact, info=opt.last_step_info)


RELU = dict(in_features=16, hidden=40, num_blocks=2, num_classes=4, linear_first_block=False)
LINEAR_FIRST = dict(in_features=32, hidden=40, num_blocks=2, num_classes=4)
NARROW = dict(in_features=16, hidden=6, num_blocks=2, num_classes=4, linear_first_block=False)

#: name -> (model, optimizer options, data options, extra): every system kind and path
CASES = {
    "dual_relu": (RELU, {}, dict(seed=0, n=N, d=16), {}),
    "linear_dual_then_dual": (LINEAR_FIRST, {}, dict(seed=1, n=N, d=32), {}),
    "linear_primal": (dict(LINEAR_FIRST, in_features=16), {}, dict(seed=2, n=N, d=16), {}),
    "primal_relu": (NARROW, {}, dict(seed=3, n=N, d=16), {}),
    "duplicate_rows_qrcp": (RELU, {}, dict(seed=4, n=N, d=16, dup=True), {}),
    "eigh_truncated": (RELU, dict(solver="eigh", rtol=1e-3), dict(seed=5, n=N, d=16), {}),
    "damped": (RELU, dict(solver="damped", damping=1e-2), dict(seed=6, n=N, d=16), {}),
    "refine_and_demote": (RELU, dict(residual_rtol=1e-30), dict(seed=7, n=N, d=16), {}),
    "two_steps": (LINEAR_FIRST, {}, dict(seed=8, n=N, d=32), dict(steps=2)),
    "dropin_mse": (RELU, {}, dict(seed=9, n=N, d=16), dict(dropin_mse=True)),
    "svd_root_path": (RELU, dict(solver="svd"), dict(seed=10, n=N, d=16), {}),
}


def _dense_step(jacobian: str, rank=None, world=None) -> dict:
    """DenseGN on an MLP, each rank stepping on its shard (N·C = 26 outputs ≤ P = 93
    parameters: an exact step)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 2)).double()
    x, y = _data(11, N, 6, 2)
    if rank is not None:
        rows = contiguous_shard(len(x), rank, world)
        x, y = x[rows], y[rows]
    opt = DenseGN(model.parameters(), lr=0.5, loss="cross_entropy", jacobian=jacobian)
    opt.step_on_batch(x, y)
    return dict(params=[p.detach().clone() for p in model.parameters()],
                exact=opt.last_step_exact, info=opt.last_step_info)


DENSE_CASES = ("linear", "per_sample", "rows")


def _run_case(name: str, rank=None, world=None) -> dict:
    if name.startswith("dense_"):
        return _dense_step(name.removeprefix("dense_"), rank, world)
    model_kw, opt_kw, data_kw, extra = CASES[name]
    return _step(model_kw, opt_kw, data_kw, rank, world, **extra)


ALL_CASES = [*CASES, *(f"dense_{j}" for j in DENSE_CASES)]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        out = {}
        for name in ALL_CASES:
            try:
                out[name] = _run_case(name, rank, world)
            except Exception as err:  # noqa: BLE001 - reported to the test, not swallowed
                out[name] = dict(error=f"{type(err).__name__}: {err}")
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp, world: int, timeout: float = 900.0) -> list[dict]:
    ctx = mp.start_processes(_worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world,
                             start_method="spawn", join=False)
    import time

    end = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > end:                   # a hang (mismatched collectives) fails
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-rank job did not finish in {timeout:.0f} s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def spawned(request, tmp_path_factory):
    world = request.param
    return world, _spawn(tmp_path_factory.mktemp(f"rowsplit{world}"), world)


@pytest.fixture(scope="module")
def reference():
    return {name: _run_case(name) for name in ALL_CASES}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("name", ALL_CASES)
def test_row_split_step_equals_the_single_process_step(spawned, reference, name):
    world, results = spawned
    ref = reference[name]
    for rank, res in enumerate(results):
        got = res[name]
        assert "error" not in got, f"rank {rank}: {got.get('error')}"
        for i, (p, q) in enumerate(zip(got["params"], ref["params"], strict=True)):
            assert _rel(p, q) <= RTOL, f"{world} ranks, rank {rank}, parameter {i}: " \
                                       f"{_rel(p, q):.2e}"
        assert got["exact"] == ref["exact"]
        ours, theirs = got["info"], ref["info"]
        if name.startswith("dense_"):
            assert ours == theirs
            continue
        for b, c in zip(ours["blocks"], theirs["blocks"], strict=True):
            for key in ("n", "rank_f", "rank_g", "full_rank", "role", "kind_f", "kind_g",
                        "accurate", "refined"):
                assert b[key] == c[key], (rank, key, b[key], c[key])
            for key in ("residual_f", "residual_g"):
                assert b[key] == pytest.approx(c[key], rel=1e-6, abs=1e-13), (rank, key)
        assert ours["relative_residual"] == pytest.approx(theirs["relative_residual"],
                                                          rel=1e-6, abs=1e-13)
    for other in results[1:]:                    # every rank: bitwise the same step and report
        assert all(torch.equal(a, b) for a, b in zip(results[0][name]["params"],
                                                     other[name]["params"], strict=True))
        assert other[name]["info"] == results[0][name]["info"]


def test_the_cases_reach_every_system_kind(reference):
    """The single-process reports show the cases exercise what the docstring lists."""
    kinds = {b[k] for name in CASES for b in reference[name]["info"]["blocks"]
             for k in ("kind_f", "kind_g")}
    assert {"dual", "primal", "linear dual", "linear primal", "dual + qrcp"} <= kinds
    assert not any(b["accurate"] for b in reference["refine_and_demote"]["info"]["blocks"])
    assert reference["dual_relu"]["exact"] is True
    assert reference["svd_root_path"]["info"]["blocks"][0]["kind_f"] == "svd"
    assert all(reference[f"dense_{j}"]["exact"] for j in DENSE_CASES)


@pytest.mark.parametrize("sizes", [[13], [7, 6], [5, 4, 4], [1, 1, 1], [4, 4, 4, 1], [6, 6, 6],
                                   [8, 8, 8, 8]])
def test_gram_tiles_cover_the_lower_triangle_once(sizes):
    n = sum(sizes)
    count = torch.zeros(n, n, dtype=torch.int64)
    work = []
    for r in range(len(sizes)):
        w = 0
        for a, b, i, j, _ in gram_tiles(sizes, r):
            count[a:b, i:j] += 1
            w += (b - a) * (j - i)
        work.append(w)
    lower = torch.tril(torch.ones(n, n, dtype=torch.int64))
    assert torch.equal(torch.tril(count), lower)          # every lower entry exactly once
    off = [sum(sizes[:r]) for r in range(len(sizes))]
    for r, s in enumerate(sizes):                          # above the diagonal: only the
        count[off[r]:off[r] + s, off[r]:off[r] + s] = 0    # diagonal blocks' upper halves
    assert int(torch.triu(count, 1).sum()) == 0
    if len(set(sizes)) == 1 and sizes[0] % 2 == 0:         # equal even shards: the same work
        assert len(set(work)) == 1, work
