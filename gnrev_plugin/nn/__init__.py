"""Reversible architectures: the additive coupling block and the RevMLP of Buffelli et al."""

from .activations import ACTIVATIONS, Activation, get_activation
from .coupling import AdditiveCoupling, BlockActivations, CouplingFunction
from .dauphin_activations import AblatedBetaGELU, AblatedGELU, AblatedTanh, BetaGELU, SyntheticNMEReLU
from .mlp import MLP, make_activation
from .revmlp import PRESETS, RevMLP, find_revmlp_owning, revmlp_from_preset, revmlp_preset_factory

__all__ = [
    "ACTIVATIONS", "Activation", "get_activation", "AdditiveCoupling", "BlockActivations",
    "CouplingFunction", "PRESETS", "RevMLP", "find_revmlp_owning", "revmlp_from_preset",
    "revmlp_preset_factory",
    "BetaGELU", "AblatedGELU", "MLP", "make_activation", "AblatedBetaGELU", "AblatedTanh", "SyntheticNMEReLU",
]
