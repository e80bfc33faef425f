"""Profile: where one ExactGN step spends its work, at the sizes of ``bench_step.py``.

For each ``(n, d, M)`` (default the four of issue #10: (128, 64, 512), (1024, 64, 512),
(1000, 784, 2000), (1024, 784, 8000); Gaussian inputs, RevMLP's default architecture, float32,
cross-entropy, one intra-op thread) it times explicit ``step_on_batch`` steps after a warm-up and
prints the median **thread CPU time** of a step (insensitive to other jobs on a shared machine)
and the functions with the most own time (``cProfile`` with a thread-CPU clock), per step. The
load average is printed before and after.

Usage: ``python benchmarks/profile_step.py [--sizes 128,64,512 ...] [--steps 3] [--top 8]``
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
import warnings

import torch

from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import ExactGN

SIZES = ("128,64,512", "1024,64,512", "1000,784,2000", "1024,784,8000")


def profile(n: int, d: int, M: int, steps: int, top: int) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, 10, (n,), generator=g)
    model = RevMLP(d, M, 2, num_classes=10, seed=0)
    opt = ExactGN(model.parameters(), lr=1e-2, loss="cross_entropy", rank_policy="warn")
    opt.step_on_batch(x, y)
    prof, times = cProfile.Profile(time.thread_time), []
    for _ in range(steps):
        t = time.thread_time()
        prof.enable()
        opt.step_on_batch(x, y)
        prof.disable()
        times.append(time.thread_time() - t)
    kinds = "; ".join(f"{b['kind_f']}/{b['kind_g']}" for b in opt.last_step_info["blocks"])
    print(f"\n(n, d, M) = ({n}, {d}, {M}): step {statistics.median(times) * 1e3:.1f} ms thread "
          f"CPU (median of {steps}); systems {kinds}; exact {opt.last_step_exact}")
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"  {'ms/step':>8}  {'calls':>5}  function")
    for (file, line, name), (_, calls, own, _, _) in rows:
        where = name if file == "~" else f"{os.path.relpath(file)}:{line}({name})"
        print(f"  {own / steps * 1e3:8.1f}  {calls / steps:5.0f}  {where[-95:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), help="n,d,M triples")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)
    load0 = os.getloadavg()
    for size in a.sizes:
        profile(*(int(v) for v in size.split(",")), a.steps, a.top)
    load1 = os.getloadavg()
    print(f"\ntorch {torch.__version__}, 1 thread; load average before {load0[0]:.2f} "
          f"{load0[1]:.2f} {load0[2]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} "
          f"({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
