"""Learned soups: mixing coefficients fitted by gradient descent on held-out data.

:func:`fit_mixing_coefficients` fits them streaming the ingredients tensor by tensor (memory
flat in the number of ingredients) or with the ingredients stacked in host or device memory;
:func:`per_tensor_method` turns learned-by-layer coefficients into the merge method the
streaming engine replays, through :func:`disk_names`.
"""

from hf_soups.learned.coefficients import MixingCoefficients
from hf_soups.learned.fit import LearnedCoefficients, fit_mixing_coefficients
from hf_soups.learned.mixed import CoefficientGradients, MixedModel
from hf_soups.learned.names import disk_names, per_tensor_method
from hf_soups.learned.placement import IngredientTensors, choose_memory

__all__ = [
    "CoefficientGradients",
    "IngredientTensors",
    "LearnedCoefficients",
    "MixedModel",
    "MixingCoefficients",
    "choose_memory",
    "disk_names",
    "fit_mixing_coefficients",
    "per_tensor_method",
]
