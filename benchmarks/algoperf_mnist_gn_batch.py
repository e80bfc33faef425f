"""Benchmark: DenseGN on AlgoPerf's MNIST model, by batch size: exact steps and time per step.

The model is AlgoPerf's own (``algoperf.workloads.mnist.mnist_pytorch.workload._Model``: 784-128-10
sigmoid MLP, PyTorch's default init, seed 0); the inputs are the shared real MNIST digits,
preprocessed as AlgoPerf's pipeline does (``(x − 0.1307)/0.3081`` with ``x`` the **raw** pixel
value in 0…255) or, with ``--scale unit``, as usual (``x`` in 0…1). Each batch size takes
``--steps`` consecutive DenseGN steps (``lr = 0.2``, ``rank_policy="warn"``, float32, one thread)
on consecutive batches of the training part, and reports per step the time, whether it was exact
(``last_step_exact``) and the rank of ``J Jᵀ`` against ``n·C``. This chose ``GN_BATCH_SIZES["mnist"]``
(``docs/runners/algoperf.md``).

Needs AlgoPerf (its ``algoperf`` package imports TensorFlow), so run it with the AlgoPerf
interpreter (``$GNREV_ALGOPERF_PYTHON``, see ``docs/runners/algoperf.md``).

Usage: ``python benchmarks/algoperf_mnist_gn_batch.py [--batches 8 16 32 64 128] [--steps 3]
[--scale raw|unit] [--data-dir DIR]``
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
import warnings

import torch

if importlib.util.find_spec("triton") is not None:  # before TensorFlow (gnrev_plugin.compat.algoperf)
    import triton._C.libtriton  # noqa: F401

from algoperf.workloads.mnist.mnist_pytorch.workload import _Model  # noqa: E402

from gnrev_plugin.build import build_optimizer  # noqa: E402
from gnrev_plugin.data import MNIST_MEAN, MNIST_STD, load_idx_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--scale", choices=("raw", "unit"), default="raw")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    ds = load_idx_dataset(args.data_dir, normalization="none")  # x / 255, in 0…1
    x_all = ds.x_train * (255.0 if args.scale == "raw" else 1.0)
    x_all = (x_all - MNIST_MEAN) / MNIST_STD
    print(f"load {os.getloadavg()[0]:.1f}; inputs: {args.scale} pixels; lr 0.2; float32")
    print("| batch | n·C | step | exact | rank | time (s) |\n|---|---|---|---|---|---|")
    for n in args.batches:
        torch.manual_seed(0)
        model = _Model()
        opt = build_optimizer("gnrev.dense_gn", model, {"lr": 0.2, "rank_policy": "warn"},
                              loss="cross_entropy")
        for step in range(args.steps):
            x = x_all[step * n:(step + 1) * n].view(n, 1, 28, 28)
            y = ds.y_train[step * n:(step + 1) * n]
            start = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            seconds = time.perf_counter() - start
            info = opt.last_step_info
            print(f"| {n} | {info['n_outputs']} | {step + 1} | {opt.last_step_exact} | "
                  f"{info['rank']} | {seconds:.2f} |", flush=True)
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
