"""Distributed ExactGN / DenseGN (gloo, 2 CPU ranks, float64) against the single-process step.

The GN batch of a distributed step is the union of the ranks' local batches in rank order; so
rank ``r`` holding the contiguous shard ``r`` of a global batch must end the step with exactly
the parameters a single process gets from one step on the whole batch (which the dense float64
oracles of ``test_exact_gn_dense_oracle.py`` / ``test_dense_gn.py`` pin). One spawned job (two
processes, a FileStore in ``tmp_path``) runs every case; each test checks one of them.
Tolerance: ``1e-9`` relative in float64 (the ranks compute their features on row subsets, whose
matrix products may round differently from the full batch's; the Grams here have ``κ ≲ 1e4``).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from realdata import REAL_MNIST, needs_real_mnist
from torch import nn

from gnrev_plugin.cli import main
from gnrev_plugin.engine.launch import check_batching
from gnrev_plugin.engine.rundir import read_jsonl
from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import DenseGN, ExactGN
from gnrev_plugin.optim.distributed import DistributedStepError, contiguous_shard
from gnrev_plugin.optim.errors import NonFiniteError

WORLD = 2
RTOL = 1e-9
N_REV, N_DENSE = 12, 8
UNEVEN = (5, 7)          # rows of rank 0 and rank 1 in the uneven case


def _revmlp() -> RevMLP:
    # ReLU block after a linear one; n = 12 ≤ M + 1 = 41 gives the second block an exact dual
    # share, while the linear block (d/2 + 1 = 9 < 12) takes the least-squares role
    return RevMLP(16, 40, 2, num_classes=4, init_std=0.3, seed=3, dtype=torch.float64)


def _mlp() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double()


def _data(seed: int, n: int, d: int, c: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randint(0, c, (n,), generator=g))


def _result(model: nn.Module, opt, loss) -> dict:
    return dict(params=[p.detach().clone() for p in model.parameters()],
                exact=opt.last_step_exact, info=opt.last_step_info,
                loss=None if loss is None else float(loss))


def _shard(t: torch.Tensor, rank: int, world: int, sizes=None) -> torch.Tensor:
    if sizes is None:
        return t[contiguous_shard(len(t), rank, world)]
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


# -- the cases: rank == world == None is the single-process reference on the whole batch ------
def case_exact_explicit(rank=None, world=None, sizes=None):
    model = _revmlp()
    x, y = _data(0, N_REV, 16, 4)
    if rank is not None:
        x, y = _shard(x, rank, world, sizes), _shard(y, rank, world, sizes)
    opt = ExactGN(model.parameters(), lr=0.7, loss="cross_entropy", rank_policy="warn",
                  verify=True)
    loss = opt.step_on_batch(x, y)
    return _result(model, opt, loss)


def case_exact_uneven(rank=None, world=None):
    return case_exact_explicit(rank, world, None if rank is None else UNEVEN)


def case_exact_dropin_ddp(rank=None, world=None):
    model = _revmlp()
    x, y = _data(0, N_REV, 16, 4)
    net = model
    if rank is not None:
        x, y = _shard(x, rank, world), _shard(y, rank, world)
        net = nn.parallel.DistributedDataParallel(model)
    opt = ExactGN(net.parameters(), lr=0.7, loss="cross_entropy", rank_policy="warn")
    opt.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    return _result(model, opt, None)


def case_dense_explicit(rank=None, world=None):
    model = _mlp()
    x, y = _data(1, N_DENSE, 6, 3)
    if rank is not None:
        x, y = _shard(x, rank, world), _shard(y, rank, world)
    opt = DenseGN(model.parameters(), lr=0.5, loss="cross_entropy")
    loss = opt.step_on_batch(x, y)
    return _result(model, opt, loss)


def case_dense_per_sample(rank=None, world=None):
    model = _mlp()
    x, y = _data(2, N_DENSE, 6, 3)
    if rank is not None:
        x, y = _shard(x, rank, world), _shard(y, rank, world)
    opt = DenseGN(model.parameters(), lr=0.5, loss="mse", jacobian="per_sample")
    t = F.one_hot(y, 3).double()
    loss = opt.step_on_batch(x, t)
    return _result(model, opt, loss)


def case_dense_dropin(rank=None, world=None):
    model = _mlp()
    x, y = _data(1, N_DENSE, 6, 3)
    if rank is not None:
        x, y = _shard(x, rank, world), _shard(y, rank, world)
    opt = DenseGN(model.parameters(), lr=0.5, loss="cross_entropy")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return _result(model, opt, None)


def case_error_agreement(rank=None, world=None):
    """A non-finite input on rank 1 only: every rank raises, no parameter changes."""
    if rank is None:
        return None
    model = _revmlp()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data(0, N_REV, 16, 4)
    x, y = _shard(x, rank, world), _shard(y, rank, world)
    if rank == 1:
        x = x.clone()
        x[0, 0] = float("nan")
    opt = ExactGN(model.parameters(), lr=0.7, loss="cross_entropy", rank_policy="warn")
    try:
        opt.step_on_batch(x, y)
        raised = None
    except (NonFiniteError, DistributedStepError) as err:
        raised = type(err).__name__
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    return dict(raised=raised, unchanged=unchanged)


CASES = {f.__name__: f for f in (case_exact_explicit, case_exact_uneven, case_exact_dropin_ddp,
                                 case_dense_explicit, case_dense_per_sample, case_dense_dropin,
                                 case_error_agreement)}


def _worker(rank: int, world: int, init_file: str, out_dir: str, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        out = {}
        for name, case in CASES.items():
            try:
                out[name] = case(rank, world)
            except Exception as err:  # noqa: BLE001 - reported to the test, not swallowed
                out[name] = dict(error=f"{type(err).__name__}: {err}")
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Run every case on 2 gloo ranks once; the results of both ranks."""
    tmp = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(WORLD, str(tmp / "store"), str(tmp)), nprocs=WORLD,
                       start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _check_same_step(spawned, name: str) -> None:
    ref = CASES[name]()
    for rank, results in enumerate(spawned):
        got = results[name]
        assert "error" not in got, f"rank {rank}: {got.get('error')}"
        for i, (p, q) in enumerate(zip(got["params"], ref["params"], strict=True)):
            assert _rel(p, q) <= RTOL, f"rank {rank}, parameter {i}: {_rel(p, q):.2e}"
        assert got["exact"] == ref["exact"]
        if ref["loss"] is not None:
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-12)
    # every rank applied bitwise the same update and reports the same (global) step
    for a, b in zip(spawned[0][name]["params"], spawned[1][name]["params"], strict=True):
        assert torch.equal(a, b)
    assert spawned[0][name]["info"] == spawned[1][name]["info"]


def test_exact_gn_explicit_two_ranks_equals_full_batch(spawned):
    _check_same_step(spawned, "case_exact_explicit")
    info, ref = spawned[1]["case_exact_explicit"]["info"], case_exact_explicit()["info"]
    # the report is the global one: n is the global batch, residuals match the full batch's
    assert [b["n"] for b in info["blocks"]] == [N_REV] * 2
    assert info["relative_residual"] == pytest.approx(ref["relative_residual"], abs=1e-12)
    assert [b["role"] for b in info["blocks"]] == ["least squares", "exact share"]


def test_exact_gn_uneven_shards(spawned):
    _check_same_step(spawned, "case_exact_uneven")


def test_exact_gn_dropin_on_ddp_model(spawned):
    _check_same_step(spawned, "case_exact_dropin_ddp")


def test_dense_gn_explicit_linear_jacobian(spawned):
    _check_same_step(spawned, "case_dense_explicit")
    assert spawned[0]["case_dense_explicit"]["info"]["n_outputs"] == N_DENSE * 3


def test_dense_gn_explicit_per_sample_jacobian(spawned):
    _check_same_step(spawned, "case_dense_per_sample")


def test_dense_gn_dropin(spawned):
    _check_same_step(spawned, "case_dense_dropin")


def test_a_failure_on_one_rank_raises_on_every_rank(spawned):
    r0, r1 = (spawned[r]["case_error_agreement"] for r in range(WORLD))
    assert r1 == dict(raised="NonFiniteError", unchanged=True)
    assert r0 == dict(raised="DistributedStepError", unchanged=True)


def test_contiguous_shards_partition_in_order():
    for n, w in ((12, 2), (7, 3), (5, 5)):
        idx = [list(range(n))[contiguous_shard(n, r, w)] for r in range(w)]
        assert sum(idx, []) == list(range(n))
        assert max(map(len, idx)) - min(map(len, idx)) <= 1
    with pytest.raises(ValueError, match="rank 2 outside"):
        contiguous_shard(4, 2, 2)


def test_explicit_group_without_init_is_a_clear_error():
    model = _revmlp()
    opt = ExactGN(model.parameters(), process_group=object())
    with pytest.raises(RuntimeError, match="not initialised"):
        opt.step_on_batch(*_data(0, 4, 16, 4))


def _nccl_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        dev = torch.device("cuda", rank)
        model = _revmlp().to(dev)
        x, y = _data(0, N_REV, 16, 4)
        x, y = _shard(x, rank, world).to(dev), _shard(y, rank, world).to(dev)
        opt = ExactGN(model.parameters(), lr=0.7, loss="cross_entropy", rank_policy="warn",
                      process_group=dist.group.WORLD)
        opt.step_on_batch(x, y)
        torch.save([p.detach().cpu() for p in model.parameters()],
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_exact_gn_nccl_matches_full_batch(tmp_path):
    """NCCL on CUDA (one rank per GPU, up to 2; with one GPU the collective path runs with
    W = 1 through the explicitly given WORLD group)."""
    world = min(2, torch.cuda.device_count())
    mp.start_processes(_nccl_worker, args=(world, str(tmp_path / "store"), str(tmp_path)),
                       nprocs=world, start_method="spawn")
    ref = case_exact_explicit()["params"]          # the single-process whole-batch step
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for p, q in zip(got, ref, strict=True):
            assert _rel(p, q) <= 1e-8


# -- gnrev train --nproc ------------------------------------------------------------------------
TRAIN = ["train", "--data", "mnist", "--data-dir", str(REAL_MNIST), "--train-size", "96",
         "--epochs", "2", "--batch-size", "32", "--model-opt", "hidden=64", "--no-progress"]


@needs_real_mnist
def test_train_nproc_2_logs_the_one_process_losses(tmp_path):
    """Two processes with 16-sample shards of every 32-sample batch log the one-process run's
    per-epoch losses. float32 (the run's dtype): the shards' forward passes round differently
    from the whole batch's, so losses agree to ``1e-5`` relative (measured ≈ 1e-7), the
    per-batch loss changes (percent) to ``1e-3``, accuracies and exact fractions exactly."""
    assert main([*TRAIN, "--out", str(tmp_path / "one")]) == 0
    assert main([*TRAIN, "--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    one, two = (read_jsonl(tmp_path / k / "log.jsonl") for k in ("one", "two"))
    assert [r["epoch"] for r in two] == [0, 1, 2]
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        for key in ("train_acc", "test_acc", "exact_frac", "steps"):
            assert b[key] == a[key], key
        for key in ("batch_loss_change_pct", "batch_loss_change_pct_first"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], abs=1e-3), key
    assert two[-1]["train_loss"] < two[0]["train_loss"]
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["nproc"] == 2 and "nproc" not in json.loads(
        (tmp_path / "one" / "config.json").read_text())


def test_train_nproc_refuses_a_batch_it_cannot_split(capsys):
    assert main(["train", "--batch-size", "33", "--nproc", "2", "--no-progress"]) == 2
    assert "not divisible by --nproc 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="last batch of each epoch has 1 samples"):
        check_batching(97, 32, 2)
