"""Benchmark: cost of one ExactGN / DenseGN step against first-order steps, measured side by side.

Prints a table of ratios (medians over interleaved rounds, so machine load hits all rows alike):

* ExactGN step / Adam step (forward + backward + update) at the MNIST paper size
  (n=1024, d=784, M=8000, L=2, C=10) and a small size, for the explicit path (``step_on_batch``)
  and the drop-in path (``loss.backward(); opt.step()``);
* achieved GFLOP/s of the explicit ExactGN step against a large fp32 matmul in the same run;
* ExactGN with the default Cholesky solver against the reference method (SVD of ``A``);
* DenseGN step / SGD step on an MLP (n=128, C=10).

Usage: ``python benchmarks/bench_step.py [--quick]`` (``--quick``: small sizes only, for CI smoke).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate
from torch import nn

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import DenseGN, ExactGN


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


def exact_gn_flops(n: int, d: int, M: int, L: int, block_rows: int = 256) -> float:
    """FLOPs of one explicit ExactGN step as executed: forward (2 matmuls per half-layer), the
    lower-block-triangle Grams of :func:`~gnrev_plugin.optim.solvers.gram_with_ones`,
    ``ΔW = ΛᵀS`` and ``2L − 1`` input JVPs (2 matmuls each); 2 FLOPs per multiply-add."""
    h = d // 2
    if n < 2 * block_rows:
        gram = 2 * n * n * M
    else:
        gram = sum(2 * min(block_rows, n - s) * min(s + block_rows, n) * M
                   for s in range(0, n, block_rows))
    per_half = 2 * (2 * n * h * M) + gram + 2 * n * h * M
    return 2 * L * per_half + (2 * L - 1) * 2 * (2 * n * h * M)


def revmlp_rows(n: int, d: int, M: int, L: int, C: int, rounds: int, with_svd: bool):
    torch.manual_seed(0)
    x = torch.randn(n, d)
    y = torch.randint(0, C, (n,))
    crit = nn.CrossEntropyLoss()
    cfg = dict(in_features=d, hidden=M, num_blocks=L, num_classes=C, linear_first_block=False,
               seed=0)
    m_adam, m_exp, m_drop = RevMLP(**cfg), RevMLP(**cfg), RevMLP(**cfg)
    adam = torch.optim.Adam(m_adam.parameters(), lr=1e-4)
    gn_exp = ExactGN(m_exp.parameters(), lr=1e-2, loss="cross_entropy")
    gn_drop = ExactGN(m_drop.parameters(), lr=1e-2, loss="cross_entropy")

    def adam_step():
        adam.zero_grad()
        crit(m_adam(x), y).backward()
        adam.step()

    def drop_in_step():
        gn_drop.zero_grad()
        crit(m_drop(x), y).backward()
        gn_drop.step()

    fns = {"adam": adam_step, "explicit": lambda: gn_exp.step_on_batch(x, y),
           "drop_in": drop_in_step}
    t = interleaved(fns, rounds)
    if with_svd:
        m_svd = RevMLP(**cfg)
        gn_svd = ExactGN(m_svd.parameters(), lr=1e-2, loss="cross_entropy", solver="svd")
        t["svd"] = interleaved({"svd": lambda: gn_svd.step_on_batch(x, y)}, 1, warmup=0)["svd"]
        t["explicit_again"] = interleaved({"e": lambda: gn_exp.step_on_batch(x, y)}, 1,
                                          warmup=0)["e"]
    return t, exact_gn_flops(n, d, M, L)


def matmul_gflops(size: int = 4096, rounds: int = 3) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    t = interleaved({"mm": lambda: a @ b}, rounds)["mm"]
    return 2 * size**3 / t / 1e9


def dense_rows(rounds: int):
    torch.manual_seed(0)
    n, C = 128, 10
    x, y = torch.randn(n, 784), torch.randint(0, C, (n,))
    make = lambda: nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),  # noqa: E731
                                 nn.ReLU(), nn.Linear(512, C))
    m_sgd, m_gn = make(), make()
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=0.1)
    gn = DenseGN(m_gn.parameters(), model=m_gn, lr=0.1, loss="cross_entropy")
    crit = nn.CrossEntropyLoss()

    def sgd_step():
        sgd.zero_grad()
        crit(m_sgd(x), y).backward()
        sgd.step()

    return interleaved({"sgd": sgd_step, "dense_gn": lambda: gn.step_on_batch(x, y)}, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    peak = matmul_gflops(2048 if args.quick else 4096)
    sizes = [("small", 256, 784, 2000, 2, 10)]
    if not args.quick:
        sizes.insert(0, ("MNIST paper", 1024, 784, 8000, 2, 10))
    rows = []
    for name, n, d, M, L, C in sizes:
        t, flops = revmlp_rows(n, d, M, L, C, args.rounds, with_svd=True)
        gflops = flops / t["explicit"] / 1e9
        rows += [
            [name, "ExactGN explicit / Adam step", f"{t['explicit'] / t['adam']:.2f}×",
             f"{t['explicit']:.3f} s / {t['adam']:.3f} s", "≤ 1.5×"],
            [name, "ExactGN drop-in / Adam step", f"{t['drop_in'] / t['adam']:.2f}×",
             f"{t['drop_in']:.3f} s / {t['adam']:.3f} s", "≤ 2.5×"],
            [name, "ExactGN explicit GFLOP/s / fp32 matmul", f"{gflops / peak:.0%}",
             f"{gflops:.1f} / {peak:.1f} GFLOP/s", "≥ 50%"],
            [name, "ExactGN svd (reference) / cholesky", f"{t['svd'] / t['explicit_again']:.1f}×",
             f"{t['svd']:.2f} s / {t['explicit_again']:.3f} s", "≥ 25×"],
        ]
    td = dense_rows(args.rounds)
    rows.append(["MLP 784-512-512-10, n=128", "DenseGN / SGD step",
                 f"{td['dense_gn'] / td['sgd']:.1f}×",
                 f"{td['dense_gn']:.4f} s / {td['sgd']:.4f} s", "≤ 20×"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.rounds} interleaved rounds")
    print(tabulate(rows, headers=["size", "ratio", "value", "times", "goal"], tablefmt="github"))


if __name__ == "__main__":
    main()
