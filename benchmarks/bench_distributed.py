"""Benchmark: one ExactGN step on 1 process against 2 gloo ranks at the same global batch.

The model is the runners' default RevMLP (d = 784, M = 1024, L = 2, linear first block, ReLU
above, fixed readout, float32); the global batch is the first ``n`` (default 1024) images of
the shared real MNIST split. Each process runs **one thread**. The one-process step runs in a
spawned process too (so both columns pay the same process setup), then the two-rank job; each
times ``--steps`` explicit steps after one warm-up and reports the median wall time and the
median thread CPU time of the slowest rank ("max-rank CPU": the work on the critical rank,
insensitive to other jobs on a shared machine; a lower bound of the step on idle cores, which
also waits for transfers and for the other ranks). The two-rank row also
splits rank 0's step into its parts: local forward + Newton target, solve (everything of the
row-split solve: Gram tiles, sweeps, products), of which "factor" is the owners' factorisations
with the classification and "collectives" the time inside collectives (transfers *and* waiting
for the other ranks), and apply. The table ends with the ratio (goal: 2 ranks ≤ 0.7 × 1 rank) and the load
average before and after.

``--data gaussian`` replaces the images by standard Gaussian inputs (full-rank Grams, so every
system takes the Cholesky path; on real MNIST the constant border pixels make the Grams
rank-deficient and the root factors them by pivoted QR).

Usage: ``python benchmarks/bench_distributed.py [--n 1024] [--hidden 1024] [--steps 5]
[--data mnist|gaussian] [--data-dir DIR]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tabulate import tabulate

from gnrev_plugin.data import load_idx_dataset
from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import ExactGN
from gnrev_plugin.optim import distributed as gdist
from gnrev_plugin.optim import distributed_solve as dsolve
from gnrev_plugin.optim.distributed import contiguous_shard


class _Timed:
    """Wraps ``owner.name`` to accumulate its wall time under ``key`` in ``acc``."""

    def __init__(self, owner, name: str, key: str, acc: dict) -> None:
        fn = getattr(owner, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
        setattr(owner, name, timed)


def _worker(rank: int, world: int, store: str, out: str, args: dict) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=r".* step is not exact Gauss-Newton")
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world)
    try:
        if args["data"] == "gaussian":
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(args["n"], 784, generator=g), torch.randint(0, 10, (args["n"],),
                                                                           generator=g)
        else:
            ds = load_idx_dataset(args["data_dir"], train_size=args["n"], test_size=10)
            x, y = ds.x_train[:args["n"]], ds.y_train[:args["n"]]
        rows = contiguous_shard(len(x), rank, world)
        x, y = x[rows].contiguous(), y[rows].contiguous()
        model = RevMLP(784, args["hidden"], 2, num_classes=10, seed=0)
        opt = ExactGN(model.parameters(), lr=0.2, loss="cross_entropy", rank_policy="warn",
                      model=model)
        parts: dict[str, float] = {}
        _Timed(opt, "_prepare_batch", "forward", parts)
        _Timed(opt, "_solve", "solve", parts)
        _Timed(opt, "_finish", "apply", parts)
        for name in ("all_gather_rows", "gather_flat", "scatter_rows", "reduce_to",
                     "broadcast_from", "all_reduce_sum", "sum_squares", "check", "gather_rows",
                     "broadcast_result"):
            _Timed(gdist.Comm, name, "collectives", parts)
        _Timed(dsolve, "resolve_row_split", "factor", parts)
        times, split, cpu = [], [], []
        for step in range(args["steps"] + 1):
            if world > 1:
                dist.barrier()
            parts.clear()
            t0, c0 = time.perf_counter(), time.thread_time()
            opt.step_on_batch(x, y)
            if step:                                   # the first is a warm-up
                times.append(time.perf_counter() - t0)
                cpu.append(time.thread_time() - c0)
                split.append(dict(parts))
        med = statistics.median(times)
        mid = split[times.index(sorted(times)[len(times) // 2])]
        torch.save(dict(median=med, all=times, parts=mid, exact=opt.last_step_exact,
                        cpu=statistics.median(cpu)),
                   os.path.join(out, f"w{world}r{rank}.pt"))
    finally:
        if world > 1:
            dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1024, help="global batch")
    p.add_argument("--hidden", type=int, default=1024, help="M")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--data", choices=("mnist", "gaussian"), default="mnist")
    p.add_argument("--data-dir", default=None, help="MNIST IDX folder (default: the shared one)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2],
                   help="rank counts to compare with one process (e.g. 2 4)")
    a = p.parse_args()
    args = dict(n=a.n, hidden=a.hidden, steps=a.steps, data=a.data, data_dir=a.data_dir)
    load0 = os.getloadavg()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, *a.ranks):
            mp.start_processes(_worker, args=(world, os.path.join(tmp, f"store{world}"), tmp,
                                              args),
                               nprocs=world, start_method="spawn")
            res[world] = torch.load(os.path.join(tmp, f"w{world}r0.pt"))
            res[world]["cpu"] = max(torch.load(os.path.join(tmp, f"w{world}r{r}.pt"))["cpu"]
                                    for r in range(world))
    load1 = os.getloadavg()
    one = res[1]["median"]

    def fmt(parts: dict) -> str:
        return ", ".join(f"{k} {v * 1e3:.0f}" for k, v in parts.items())
    rows = [[f"{w} gloo ranks" if w > 1 else "1 process", f"{res[w]['median']:.3f}",
             f"{res[w]['median'] / one:.2f}", f"{res[w]['cpu']:.3f}",
             f"{res[w]['cpu'] / res[1]['cpu']:.2f}", fmt(res[w]["parts"]), res[w]["exact"]]
            for w in res]
    print(f"ExactGN step, RevMLP d=784 M={a.hidden} L=2 (linear first block), global batch "
          f"{a.n} of {'real MNIST' if a.data == 'mnist' else 'Gaussian inputs'}, float32, "
          f"1 thread per process; median of {a.steps} steps")
    print(tabulate(rows, headers=["", "step s", "ratio", "max-rank CPU s", "CPU ratio",
                                  "rank 0 parts (ms)", "exact"]))
    for w in a.ranks:
        goal = {2: 0.7, 4: 0.45}.get(w)
        if goal is not None:
            r = res[w]["median"] / one
            print(f"goal {w} ranks ≤ {goal} × 1 process: {'met' if r <= goal else 'missed'} "
                  f"(ratio {r:.2f})")
    print("all steps (s): " + " | ".join(f"{w}: " + " ".join(f"{t:.3f}" for t in res[w]["all"])
                                         for w in res))
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after "
          f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
