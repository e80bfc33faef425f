"""The DeepOBS runs committed here: ``gnrev.dense_gn`` (registered defaults) and ``gnrev.sgd``
(lr 0.1) on DeepOBS's ``mnist_mlp`` on the local t10k split (``mnist_mlp_t10k``), batch 128,
3 epochs, seeds 42, 43, 44, through DeepOBS's own StandardRunner, one intra-op thread.

Run from the repository root: ``python docs/results/deepobs/run_seeds.py``. (The committed JSONs
were written to a scratch folder by this script with ``output_dir="/tmp/seed_results"`` and
copied here.)
"""

import time

import torch

from gnrev_plugin.hosts import deepobs as dob

torch.set_num_threads(1)
data = dob.prepare_mnist_data_dir("/tmp/deepobs_data")
dob.register_local_mnist_problems()
for seed in (42, 43, 44):
    for opt, hps in (("dense_gn", {}), ("sgd", {"lr": 0.1})):
        t = time.time()
        out = dob.run_deepobs(opt, "mnist_mlp_t10k", hps, batch_size=128, num_epochs=3,
                              random_seed=seed, output_dir="docs/results/deepobs", data_dir=data)
        print(seed, opt, f"{time.time() - t:.0f}s", out["test_accuracies"], flush=True)
