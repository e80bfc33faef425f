"""Benchmark: one ExactGN step against one Adam step on what users run, measured side by side.

Every row times ExactGN (explicit ``step_on_batch`` and the drop-in ``loss.backward();
opt.step()``) and Adam (``zero_grad``, forward, cross-entropy, ``backward``, ``step``) on the same
batch in interleaved rounds, and prints medians and their ratios from the same run, so machine
load hits all columns alike. The model is ``RevMLP``'s default architecture (a **linear first
block**, ReLU above, fixed orthonormal readout, L = 2, float32) unless a row says otherwise.

Rows:

* the four sizes of issue #10 on Gaussian inputs: small (n=128, d=64, M=512), batch > width
  (1024, 64, 512: every block least squares, so ``rank_policy="warn"``), an MNIST mini-batch
  (1000, 784, 2000) and the paper size (1024, 784, 8000, fewer rounds);
* the nonlinear-first variant at the paper size (the architecture the old benchmark measured);
* real data: an MNIST batch (1000, 784, 2000) from the shared IDX files, whose rank loss comes
  from the data (constant border pixels), and real digits-size batches (MNIST average-pooled to
  8×8, n = 128, M = 512);
* contention: the digits-size step timed while a second process runs 2-thread float32 matmuls,
  against the same step on the unloaded machine; the column is the slowdown of ExactGN divided by
  the slowdown of Adam measured in the same rounds;
* DenseGN / SGD on an MLP, for reference;
* the work of each step: median thread CPU time at one thread, the same ratios without the
  scheduler (on a shared machine wall time also measures the other jobs).

Usage: ``python benchmarks/bench_step.py [--quick] [--data-dir DIR] [--rounds R]``
(``--quick``: the small rows only).

``--device cuda [--size n,d,M] [--json PATH]`` prints only the accelerator table: at one size
(default the paper's, 1024, 784, 8000, Gaussian inputs) ExactGN (explicit and drop-in) against
Adam in float32 and under ``torch.autocast(dtype=torch.bfloat16)`` (the step itself runs in
float32/float64: :func:`~gnrev_plugin.optim.capture.autocast_disabled`), timed with
``torch.cuda.synchronize``; absolute milliseconds and ratios. ``--device cpu --size 64,16,32``
runs the same code on the CPU (``benchmarks/gpu_check.sh --dry-run``).

The table ends with the machine's load average before and after the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
from tabulate import tabulate
from torch import nn

from gnrev_plugin.data import load_idx_dataset
from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import DenseGN, ExactGN, solvers

_COMPETITOR = (
    "import torch, sys\n"
    "torch.set_num_threads(2)\n"
    "a = torch.randn(1024, 1024)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a * 1e-3)\n"
)


def interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each callable over ``rounds`` interleaved rounds (and, under
    ``"<name> min"``, the fastest round: on a shared machine the least disturbed one)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"{k} min": min(v) for k, v in times.items()})
    return out


def gaussian_batch(n: int, d: int, C: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, C, (n,), generator=g)


def mnist_batch(data_dir: str | None, n: int, digits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` training images of the shared MNIST split (normalised as in the paper);
    ``digits``: average-pooled to 8×8 (d = 64), the size of scikit-learn's digits."""
    ds = load_idx_dataset(data_dir, train_size=max(n, 1024), test_size=10)
    x, y = ds.x_train[:n], ds.y_train[:n]
    if digits:
        x = nn.functional.adaptive_avg_pool2d(x.reshape(n, 1, 28, 28), (8, 8)).reshape(n, 64)
    return x.contiguous(), y


class Pair:
    """ExactGN (explicit and drop-in) and Adam on three copies of one RevMLP and one batch."""

    def __init__(self, x, y, M: int, linear_first: bool = True, warn: bool = False) -> None:
        cfg = dict(in_features=x.shape[1], hidden=M, num_blocks=2, num_classes=10,
                   linear_first_block=linear_first, seed=0)
        self.x, self.y = x, y
        self.m_adam, self.m_exp, self.m_drop = RevMLP(**cfg), RevMLP(**cfg), RevMLP(**cfg)
        self.crit = nn.CrossEntropyLoss()
        self.adam = torch.optim.Adam(self.m_adam.parameters(), lr=1e-4)
        kw = dict(lr=1e-2, loss="cross_entropy", rank_policy="warn" if warn else "raise")
        self.exp = ExactGN(self.m_exp.parameters(), **kw)
        self.drop = ExactGN(self.m_drop.parameters(), **kw)

    def adam_step(self) -> None:
        self.adam.zero_grad()
        self.crit(self.m_adam(self.x), self.y).backward()
        self.adam.step()

    def explicit_step(self) -> None:
        self.exp.step_on_batch(self.x, self.y)

    def drop_in_step(self) -> None:
        self.drop.zero_grad()
        self.crit(self.m_drop(self.x), self.y).backward()
        self.drop.step()

    def fns(self, drop_in: bool = True) -> dict:
        f = {"adam": self.adam_step, "explicit": self.explicit_step}
        if drop_in:
            f["drop_in"] = self.drop_in_step
        return f

    def systems(self) -> str:
        info = self.exp.last_step_info
        parts = [f"{b['kind_f']} r{b['rank_f']}/{b['n']}" for b in info.get("blocks", [])]
        return "; ".join(parts) + f"; exact={self.exp.last_step_exact}"


def ratio_row(name: str, data: str, t: dict, goal: str, systems: str) -> list:
    drop = f"{t['drop_in'] / t['adam']:.2f}×" if "drop_in" in t else "–"
    return [name, data, f"{t['explicit'] / t['adam']:.2f}×", goal,
            f"{t['explicit min'] / t['adam min']:.2f}×", drop,
            f"{t['explicit'] * 1e3:.1f} / {t['adam'] * 1e3:.1f}", systems]


class threaded_factorisations:  # noqa: N801 - a context manager
    """Counterfactual for the contention row: let every factorisation use all intra-op threads
    (``solvers.single_threaded`` becomes a no-op), as before issue #10."""

    def __enter__(self) -> None:
        self._init = solvers.single_threaded.__init__
        solvers.single_threaded.__init__ = lambda s, active=True: setattr(s, "active", False)

    def __exit__(self, *exc) -> None:
        solvers.single_threaded.__init__ = self._init


def contention(x, y, M: int, rounds: int, cycles: int = 3) -> dict:
    """Step times with the machine as it is ("quiet") and with a second process running 2-thread
    matmuls ("busy"), in ``cycles`` alternating phases of ``rounds`` interleaved rounds each (so
    drifts of the machine's own load hit both phases); medians over all rounds of a phase. Adam,
    ExactGN, and ExactGN with threaded factorisations are interleaved in every round."""
    pair, other = Pair(x, y, M, warn=True), Pair(x, y, M, warn=True)

    def threaded_step() -> None:
        with threaded_factorisations():
            other.explicit_step()

    fns = {"adam": pair.adam_step, "gn": pair.explicit_step, "gn_threaded": threaded_step}
    for f in fns.values():
        f()
    samples = {phase: {k: [] for k in fns} for phase in ("quiet", "busy")}

    def run(phase: str) -> None:
        for _ in range(rounds):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                samples[phase][k].append(time.perf_counter() - t)

    for _ in range(cycles):
        run("quiet")
        proc = subprocess.Popen([sys.executable, "-c", _COMPETITOR], stdout=subprocess.PIPE,
                                text=True)
        try:
            proc.stdout.readline()                 # the competitor is running
            time.sleep(0.3)
            run("busy")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    med = {ph: {k: statistics.median(v) for k, v in d.items()} for ph, d in samples.items()}
    return {"quiet": med["quiet"], "busy": med["busy"], "systems": pair.systems()}


def cpu_work(x, y, M: int, rounds: int, warn: bool = False) -> dict[str, float]:
    """Median **thread CPU time** of each step at one intra-op thread: the work done, insensitive
    to other jobs taking the cores (wall time under load measures the scheduler as well)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pair = Pair(x, y, M, warn=warn)
        fns = pair.fns()
        for f in fns.values():
            f()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                t = time.thread_time()
                f()
                times[k].append(time.thread_time() - t)
    finally:
        torch.set_num_threads(old)
    return {k: statistics.median(v) for k, v in times.items()}


def dense_rows(rounds: int) -> dict[str, float]:
    x, y = gaussian_batch(128, 784)
    make = lambda: nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),  # noqa: E731
                                 nn.ReLU(), nn.Linear(512, 10))
    torch.manual_seed(0)
    m_sgd, m_gn = make(), make()
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=0.1)
    gn = DenseGN(m_gn.parameters(), model=m_gn, lr=0.1, loss="cross_entropy")
    crit = nn.CrossEntropyLoss()

    def sgd_step():
        sgd.zero_grad()
        crit(m_sgd(x), y).backward()
        sgd.step()

    return interleaved({"sgd": sgd_step, "dense_gn": lambda: gn.step_on_batch(x, y)}, rounds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_rows(device: str, n: int, d: int, M: int, rounds: int) -> list[dict]:
    """ExactGN (explicit, drop-in) and Adam on ``device`` at ``(n, d, M)``, float32 and bf16
    autocast: median milliseconds over ``rounds`` interleaved rounds (synchronised) and ratios."""
    dev = torch.device(device)
    x, y = (t.to(dev) for t in gaussian_batch(n, d))
    cfg = dict(in_features=d, hidden=M, num_blocks=2, num_classes=10, seed=0)
    return [_precision_row(dev, x, y, cfg, prec, rounds)
            for prec in ("float32", "bf16 autocast")]


def _precision_row(dev: torch.device, x, y, cfg: dict, prec: str, rounds: int) -> dict:
    """One row of :func:`device_rows`: fresh models, ``prec`` ``"float32"`` or ``"bf16 autocast"``."""
    crit = nn.CrossEntropyLoss()
    models = {k: RevMLP(**cfg).to(dev) for k in ("adam", "explicit", "drop_in")}
    adam = torch.optim.Adam(models["adam"].parameters(), lr=1e-4)
    kw = dict(lr=1e-2, loss="cross_entropy", rank_policy="warn")
    exp = ExactGN(models["explicit"].parameters(), **kw)
    drop = ExactGN(models["drop_in"].parameters(), **kw)
    amp = prec != "float32"

    def backward_step(model, opt):
        opt.zero_grad()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = crit(model(x), y)
        loss.backward()
        opt.step()

    def timed(fn):
        def run():
            fn()
            _sync(dev)
        return run
    fns = {"adam": timed(lambda: backward_step(models["adam"], adam)),
           "explicit": timed(lambda: exp.step_on_batch(x, y)),
           "drop_in": timed(lambda: backward_step(models["drop_in"], drop))}
    t = interleaved(fns, rounds, warmup=2)
    n, d = x.shape
    return dict(device=str(dev), size=f"({n}, {d}, {cfg['hidden']})", precision=prec,
                adam_ms=t["adam"] * 1e3, explicit_ms=t["explicit"] * 1e3,
                drop_in_ms=t["drop_in"] * 1e3, explicit_ratio=t["explicit"] / t["adam"],
                drop_in_ratio=t["drop_in"] / t["adam"], exact=exp.last_step_exact)


def device_main(args) -> None:
    n, d, M = (int(v) for v in args.size.split(","))
    rows = device_rows(args.device, n, d, M, args.rounds)
    name = (torch.cuda.get_device_name(torch.device(args.device))
            if torch.device(args.device).type == "cuda" else "cpu")
    print(f"torch {torch.__version__}, {name}, RevMLP L = 2 (linear first block), "
          f"cross-entropy, Gaussian inputs; median of {args.rounds} interleaved rounds")
    print(tabulate([[r["size"], r["precision"], f"{r['explicit_ratio']:.2f}×",
                     f"{r['drop_in_ratio']:.2f}×", f"{r['explicit_ms']:.1f}",
                     f"{r['drop_in_ms']:.1f}", f"{r['adam_ms']:.1f}", r["exact"]] for r in rows],
                   headers=["size (n, d, M)", "precision", "explicit / Adam", "drop-in / Adam",
                            "explicit ms", "drop-in ms", "Adam ms", "exact"],
                   tablefmt="github"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small rows only")
    ap.add_argument("--device", default=None,
                    help="only the accelerator table, on this device (cuda, cuda:1, or cpu)")
    ap.add_argument("--size", default="1024,784,8000", help="n,d,M of the --device table")
    ap.add_argument("--json", default=None, help="also write the --device table as JSON here")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (paper size: 3)")
    ap.add_argument("--data-dir", default=None, help="MNIST IDX folder (default: the shared one)")
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)       # the batch > width rows are inexact
    if args.device is not None:
        device_main(args)
        return
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    R = args.rounds
    rows = []

    def run(name, data, x, y, M, goal, rounds=R, **kw):
        pair = Pair(x, y, M, **kw)
        t = interleaved(pair.fns(), rounds)
        rows.append(ratio_row(name, data, t, goal, pair.systems()))
        print(f"  done: {name} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    xd, yd = mnist_batch(args.data_dir, 128, digits=True)
    run("small (128, 64, 512)", "Gaussian", *gaussian_batch(128, 64), 512, "≤ 2×")
    run("small (128, 64, 512)", "MNIST 8×8", xd, yd, 512, "≤ 2×", warn=True)
    run("batch > width (1024, 64, 512)", "Gaussian", *gaussian_batch(1024, 64), 512, "≤ 3×",
        warn=True)
    if not args.quick:
        run("MNIST batch (1000, 784, 2000)", "Gaussian", *gaussian_batch(1000, 784), 2000,
            "≤ 1.5×")
        run("MNIST batch (1000, 784, 2000)", "MNIST", *mnist_batch(args.data_dir, 1000, False),
            2000, "≤ 1.5×")
        paper = gaussian_batch(1024, 784)
        run("paper (1024, 784, 8000)", "Gaussian", *paper, 8000, "≤ 1.5×", rounds=min(R, 3))
        run("paper, nonlinear first block", "Gaussian", *paper, 8000, "(was 1.59×)",
            rounds=min(R, 3), linear_first=False)
    c = contention(xd, yd, 512, max(R, 9))
    print(f"  done: contention ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    work = []
    sizes = [("small (128, 64, 512)", gaussian_batch(128, 64), 512, False),
             ("batch > width (1024, 64, 512)", gaussian_batch(1024, 64), 512, True)]
    if not args.quick:
        sizes += [("MNIST batch (1000, 784, 2000)", gaussian_batch(1000, 784), 2000, False),
                  ("paper (1024, 784, 8000)", gaussian_batch(1024, 784), 8000, False)]
    for name, (xw, yw), M, warn in sizes:
        t = cpu_work(xw, yw, M, 3 if M == 8000 else R, warn)
        work.append([name, f"{t['explicit'] / t['adam']:.2f}×", f"{t['drop_in'] / t['adam']:.2f}×",
                     f"{t['explicit'] * 1e3:.1f} / {t['adam'] * 1e3:.1f}"])
    print(f"  done: one-thread work ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
          flush=True)
    td = dense_rows(R)
    load1 = os.getloadavg()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, L = 2, "
          f"cross-entropy; median of {R} interleaved rounds (paper size: {min(R, 3)}); "
          f"{time.perf_counter() - t0:.0f} s in all")
    print(tabulate(rows, headers=["size (n, d, M)", "data", "ExactGN explicit / Adam", "goal",
                                  "(fastest rounds)", "drop-in / Adam", "explicit / Adam ms",
                                  "block systems"], tablefmt="github"))
    q, b = c["quiet"], c["busy"]
    slow = {k: b[k] / q[k] for k in q}
    print()
    print(tabulate([
        ["ExactGN slowdown / Adam slowdown under a 2-thread matmul process",
         f"{slow['gn'] / slow['adam']:.2f}×", "≤ 2×",
         f"GN {q['gn'] * 1e3:.1f} → {b['gn'] * 1e3:.1f} ms ({slow['gn']:.2f}×); Adam "
         f"{q['adam'] * 1e3:.1f} → {b['adam'] * 1e3:.1f} ms ({slow['adam']:.2f}×)"],
        ["ExactGN / Adam under that load (MNIST 8×8, n=128, M=512)",
         f"{b['gn'] / b['adam']:.2f}×", "", c["systems"]],
        ["same rounds, factorisations threaded (before #10): slowdown / Adam's",
         f"{slow['gn_threaded'] / slow['adam']:.2f}×", "",
         f"GN {q['gn_threaded'] * 1e3:.1f} → {b['gn_threaded'] * 1e3:.1f} ms "
         f"({slow['gn_threaded']:.2f}×)"],
        ["DenseGN / SGD step (MLP 784-512-512-10, n=128)",
         f"{td['dense_gn'] / td['sgd']:.1f}×", "≤ 20×",
         f"{td['dense_gn'] * 1e3:.1f} / {td['sgd'] * 1e3:.1f} ms"],
    ], headers=["contention and reference", "ratio", "goal", "times"], tablefmt="github"))
    print()
    print(tabulate(work, headers=["work at one thread, Gaussian (thread CPU time)",
                                  "explicit / Adam", "drop-in / Adam", "explicit / Adam ms"],
                   tablefmt="github"))
    print(f"\nload average (1, 5, 15 min): before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
