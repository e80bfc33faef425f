"""Shared test settings: float64 oracles and a bounded thread count on the 2-core CI machine."""

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
