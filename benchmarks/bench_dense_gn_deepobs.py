"""DenseGN step vs an SGD step on DeepOBS's own ``mnist_mlp`` / ``mnist_2c2d`` networks.

Side by side in one process per problem (median of interleaved rounds, float32, 2 intra-op
threads, a real MNIST batch of 128 from gnrev's MNIST folder):

* ``mlp``: DenseGN (structured Linear Grams) / SGD step; goal ≤ 5×, peak RSS ≤ 1 GiB;
* ``2c2d``: DenseGN (structured Conv2d + Linear Grams) / SGD step; goal ≤ 40×, peak RSS ≤ 2 GiB;
* ``2c2d_cg``: matrix-free DenseGN (``solver="cg"``, ``cg_tol = 1e-4``): CG iterations, true
  residual and time / SGD step; goal ≤ 100× to a residual of 1e-4 (capped at ``--cg-max-iter``
  iterations; the true residual reached is reported).

Each problem runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own. Usage:
``python benchmarks/bench_dense_gn_deepobs.py [--rounds 5] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

GOALS = {"mlp": (5.0, 1024), "2c2d": (40.0, 2048), "2c2d_cg": (100.0, 2048)}


def _setup(problem: str, batch: int):
    import torch  # noqa: PLC0415

    from gnrev_plugin.compat import deepobs as compat  # noqa: PLC0415
    from gnrev_plugin.data import load_idx_dataset  # noqa: PLC0415

    torch.set_num_threads(2)
    torch.manual_seed(0)
    modules = compat.import_deepobs().pytorch.testproblems.testproblems_modules
    ds = load_idx_dataset(None, normalization="none")
    x = ds.x_train[:batch].reshape(batch, 1, 28, 28).float()
    y = ds.y_train[:batch]
    make = modules.net_mlp if problem == "mlp" else modules.net_mnist_2c2d
    return torch, make, x, y


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_problem(problem: str, rounds: int, batch: int, cg_max_iter: int = 100) -> dict:
    """One problem's timings (its own process)."""
    torch, make, x, y = _setup(problem, batch)
    from gnrev_plugin.optim import DenseGN  # noqa: PLC0415

    torch.manual_seed(0)
    sgd_net, gn_net = make(10), make(10)
    gn_net.load_state_dict(sgd_net.state_dict())
    sgd = torch.optim.SGD(sgd_net.parameters(), lr=0.01)
    crit = torch.nn.CrossEntropyLoss()
    opts = dict(lr=0.05, loss="cross_entropy", rank_policy="warn")
    if problem == "2c2d_cg":
        opts.update(solver="cg", cg_tol=1e-4, cg_max_iter=cg_max_iter)
    gn = DenseGN(gn_net.parameters(), model=gn_net, **opts)

    def sgd_step():
        sgd.zero_grad()
        crit(sgd_net(x), y).backward()
        sgd.step()

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # imports, data, nets
    sgd_step()                                           # warm-up (DenseGN's too, except CG's)
    if problem != "2c2d_cg":
        gn.step_on_batch(x, y)
    t_sgd, t_gn, infos = [], [], []
    for _ in range(rounds):
        t_sgd.append(_time(sgd_step))
        t_gn.append(_time(lambda: gn.step_on_batch(x, y)))
        infos.append(dict(gn.last_step_info))
    last = infos[-1]
    out = {"problem": problem, "batch": batch, "rounds": rounds,
           "params": sum(p.numel() for p in gn_net.parameters()),
           "sgd_s": statistics.median(t_sgd), "gn_s": statistics.median(t_gn),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "baseline_rss_mib": baseline,
           "layers": last.get("layers"), "exact": [i["exact"] for i in infos]}
    if problem == "2c2d_cg":
        out["cg_iterations"] = [i["cg_iterations"] for i in infos]
        out["true_residual"] = [i["true_residual"] for i in infos]
        out["preconditioner"] = last["preconditioner"]
    out["ratio"] = out["gn_s"] / out["sgd_s"]
    return out


def _table(rows: list[dict]) -> str:
    lines = ["| problem (batch 128, float32, 2 threads) | SGD step | DenseGN step | ratio | goal | "
             "peak RSS (before the first step) | notes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        goal, rss_goal = GOALS[r["problem"]]
        note = ""
        if "cg_iterations" in r:
            note = (f"CG iterations {r['cg_iterations']}, true residual "
                    f"{max(r['true_residual']):.1e}, preconditioner {r['preconditioner']}")
        elif r["layers"]:
            note = ", ".join(f"{k}: {v}" for k, v in r["layers"].items())
        lines.append(f"| `{r['problem']}` (P = {r['params']:,}) | {r['sgd_s'] * 1e3:.1f} ms | "
                     f"{r['gn_s'] * 1e3:.0f} ms | {r['ratio']:.1f}× | ≤ {goal:g}× "
                     f"({'met' if r['ratio'] <= goal else 'missed'}) | {r['peak_rss_mib']:.0f} MiB "
                     f"({r['baseline_rss_mib']:.0f} MiB) "
                     f"(≤ {rss_goal} MiB: {'met' if r['peak_rss_mib'] <= rss_goal else 'missed'})"
                     f" | {note} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cg-rounds", type=int, default=1, help="rounds of the (slow) CG problem")
    ap.add_argument("--cg-max-iter", type=int, default=100,
                    help="CG iteration cap (the true residual reached is reported)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--problems", nargs="+", default=list(GOALS), choices=list(GOALS))
    ap.add_argument("--one", choices=list(GOALS), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_problem(args.one, args.rounds, args.batch, args.cg_max_iter)))
        return
    rows = []
    for problem in args.problems:
        print(f"[bench] {problem} ...", file=sys.stderr, flush=True)
        rounds = args.cg_rounds if problem == "2c2d_cg" else args.rounds
        done = subprocess.run([sys.executable, __file__, "--one", problem, "--rounds",
                               str(rounds), "--batch", str(args.batch), "--cg-max-iter",
                               str(args.cg_max_iter)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
