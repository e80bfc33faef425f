"""Shared test settings: float64 oracles and a bounded thread count on the 2-core CI machine."""

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

import os  # noqa: E402

from hypothesis import settings  # noqa: E402

# CI runs are deterministic (same examples every run); local runs keep exploring.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
