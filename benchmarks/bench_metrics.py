"""Benchmark the metrics: structured RevMLP NTK vs torch.func, and ``decompose`` on ~100k params.

Table 1 times the empirical NTK ``Θ = J Jᵀ`` (``nC × nC``, float64) of a RevMLP two ways, measured
side by side in one run (interleaved repeats, median wall time):

* ``structured``: :func:`gnrev_plugin.metrics.revmlp_ntk`, ``Σ_l (A_l A_lᵀ ⊗ 1) ⊙ (Γ_l Γ_lᵀ)``;
* ``torch.func``: per-sample ``vmap(jacrev(·))`` Jacobians and the contraction ``Σ_p J_p J_pᵀ``.

and checks that the two kernels agree (max abs difference). Table 2 times
:func:`gnrev_plugin.metrics.decompose` and its summary (traces by Hutch++, top-5 eigenvalues of H, G
and NME by Lanczos/eigsh, ``λ_min(H)``) on a RevMLP with about 100k parameters.

Usage: ``python benchmarks/bench_metrics.py [--quick] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from tabulate import tabulate
from torch import nn

from gnrev_plugin.metrics import decompose, empirical_ntk, revmlp_ntk
from gnrev_plugin.nn import RevMLP


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_ntk(n: int, C: int, d: int, Ms: list[int], L: int, repeats: int) -> list[list]:
    rows = []
    for M in Ms:
        model = RevMLP(d, M, L, num_classes=C, seed=0, init_std=0.1).double()
        X = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        P = sum(p.numel() for p in model.parameters())
        revmlp_ntk(model, X[:8])                                  # warm-up both paths
        empirical_ntk(model, X[:8], method="func")
        t_s, t_f, diff, scale = [], [], 0.0, 0.0
        for _ in range(repeats):                                  # interleaved, same conditions
            ts, Ks = timed(lambda m=model, x=X: revmlp_ntk(m, x))
            tf, Kf = timed(lambda m=model, x=X: empirical_ntk(m, x, method="func"))
            t_s.append(ts)
            t_f.append(tf)
            diff = max(diff, (Ks - Kf).abs().max().item())
            scale = Kf.abs().max().item()
            del Ks, Kf
        ms, mf = statistics.median(t_s), statistics.median(t_f)
        bs, bf = min(t_s), min(t_f)
        rows.append([n, C, d, M, L, P, f"{ms * 1e3:.1f}", f"{mf * 1e3:.1f}", f"{mf / ms:.1f}x",
                     f"{bs * 1e3:.1f}", f"{bf * 1e3:.1f}", f"{bf / bs:.1f}x",
                     f"{diff:.1e}", f"{diff / scale:.1e}"])
    return rows


def bench_decompose(n: int, C: int, d: int, M: int, L: int, num_matvecs: int) -> tuple:
    model = RevMLP(d, M, L, num_classes=C, seed=0, init_std=0.1, linear_first_block=False,
                   activation="gelu").double()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    data = [(X[: n // 2], y[: n // 2]), (X[n // 2:], y[n // 2:])]
    P = sum(p.numel() for p in model.parameters())
    t_build, dec = timed(lambda: decompose(model, nn.CrossEntropyLoss(), data))
    v = torch.randn(P, dtype=torch.float64)
    per_mv = {}
    for key in ("hessian", "ggn", "nme", "nme_surrogate"):
        op = getattr(dec, key)
        op @ v                                                     # warm-up
        per_mv[key] = statistics.median(timed(lambda op=op: op @ v)[0] for _ in range(3))
    t_sum, s = timed(lambda: dec.summary(top_k=5, exact_max_dim=0, num_matvecs=num_matvecs,
                                         per_block=False, trace_estimator="hutchpp",
                                         frobenius=False, nme_operator="surrogate",
                                         eigsh_tol=1e-4))
    rows = []
    for key in ("hessian", "ggn", "nme"):
        rows.append([key, f"{per_mv[key] * 1e3:.1f}", f"{s.trace[key].value:.4g}",
                     f"{s.trace[key].estimator}({s.trace[key].num_matvecs})",
                     ", ".join(f"{e:.3g}" for e in s.top_eigenvalues[key]),
                     s.eigs_info[key].num_matvecs, s.eigs_info[key].converged])
    info = dict(P=P, n=n, C=C, d=d, M=M, L=L, t_build=t_build, t_summary=t_sum,
                lambda_min=s.lambda_min_hessian,
                lambda_min_mv=s.eigs_info["hessian_min"].num_matvecs,
                surrogate_mv_ms=per_mv["nme_surrogate"] * 1e3,
                surrogate_rel=s.surrogate_check.relative,
                ratios=s.ratios)
    return rows, info


def table_ntk(n: int, Ms: list[int], repeats: int) -> None:
    rows = bench_ntk(n=n, C=10, d=32, Ms=Ms, L=2, repeats=repeats)
    print("\nTable 1: empirical NTK (nC x nC), structured RevMLP path vs torch.func jacrev "
          f"contraction ({repeats} interleaved repeats: median and best)")
    print(tabulate(rows, headers=["n", "C", "d", "M", "L", "P", "structured ms", "torch.func ms",
                                  "speed-up", "best struct. ms", "best func ms", "best speed-up",
                                  "max|diff|", "rel diff"]))


def table_decompose(quick: bool, dM: int) -> None:
    rows, info = bench_decompose(n=16 if quick else 64, C=10, d=64, M=dM, L=2,
                                 num_matvecs=30)
    print(f"\nTable 2: decompose() on a GELU RevMLP, P={info['P']:,} parameters, n={info['n']}, "
          f"C={info['C']}, d={info['d']}, M={info['M']}, L={info['L']}, cross-entropy")
    print(f"  decompose() build: {info['t_build']:.2f} s;  summary(top_k=5, Hutch++ traces, "
          f"eigsh tol 1e-4, lambda_min(H); NME via the surrogate operator; no Frobenius): "
          f"{info['t_summary']:.1f} s")
    print(tabulate(rows, headers=["operator", "ms / matvec", "trace", "estimator(matvecs)",
                                  "top-5 eigenvalues", "eigsh matvecs", "converged"]))
    print(f"  lambda_min(H) = {info['lambda_min']:.4g} ({info['lambda_min_mv']} matvecs); "
          f"surrogate-NME matvec {info['surrogate_mv_ms']:.1f} ms, "
          f"|NME_surr v - (H-G) v| / |(H-G) v| = {info['surrogate_rel']:.1e}")
    print(f"  ratios: {info['ratios']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["ntk", "decompose"], default=None,
                    help="run one table only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads={torch.get_num_threads()}, float64")

    n, Ms, dM = (64, [32], 64) if args.quick else (256, [32, 64, 128, 256], 768)
    if args.only in (None, "ntk"):
        table_ntk(n, Ms, args.repeats)
    if args.only in (None, "decompose"):
        table_decompose(args.quick, dM)


if __name__ == "__main__":
    main()
