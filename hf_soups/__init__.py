"""hf_soups: model soups, WiSE-FT and weight averaging for the Hugging Face ecosystem."""

import importlib
from typing import TYPE_CHECKING

from hf_soups.errors import (
    CallbackConflictError,
    CorruptedCheckpointError,
    HfSoupsError,
    HubPushError,
    IncompatibleIngredientsError,
    IngredientNotFoundError,
    InvalidWeightsError,
    LabelMismatchError,
    MissingBaseError,
    NonFiniteWeightsError,
    OutputExistsError,
    OutputOverlapsInputError,
    RecipeError,
    UnpairedResultsError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
    WeightsFormatError,
    ZeroShotTaskError,
    ZeroShotTooWeakError,
)

# Public names and the modules that define them, imported on first use: the model families pull
# in transformers and open_clip, which the command line's --help should not wait for.
_LAZY = {
    "Ingredient": "hf_soups.ingredients",
    "check_compatible": "hf_soups.ingredients",
    "merge": "hf_soups.merge",
    "weighted_state_dict": "hf_soups.merge",
    "Evaluator": "hf_soups.evaluation",
    "EvalResult": "hf_soups.evaluation",
    "Soup": "hf_soups.soup",
    "SoupBuilder": "hf_soups.builder",
    "load_model": "hf_soups.models",
    "ZeroShotTask": "hf_soups.models",
    "wise_ft": "hf_soups.patching",
    "choose_wise_ft": "hf_soups.patching",
    "patch": "hf_soups.patching",
    "sweep": "hf_soups.patching",
    "paired_comparison": "hf_soups.stats",
    "holm_adjust": "hf_soups.stats",
    "as_scorer": "hf_soups.evaluation",
}

if TYPE_CHECKING:
    from hf_soups.builder import SoupBuilder
    from hf_soups.evaluation import EvalResult, Evaluator, as_scorer
    from hf_soups.ingredients import Ingredient, check_compatible
    from hf_soups.merge import merge, weighted_state_dict
    from hf_soups.models import ZeroShotTask, load_model
    from hf_soups.patching import choose_wise_ft, patch, sweep, wise_ft
    from hf_soups.soup import Soup
    from hf_soups.stats import holm_adjust, paired_comparison


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_soups' has no attribute {name!r}")


__all__ = [
    "CallbackConflictError",
    "CorruptedCheckpointError",
    "HfSoupsError",
    "HubPushError",
    "IncompatibleIngredientsError",
    "IngredientNotFoundError",
    "InvalidWeightsError",
    "LabelMismatchError",
    "MissingBaseError",
    "NonFiniteWeightsError",
    "OutputExistsError",
    "OutputOverlapsInputError",
    "RecipeError",
    "UnpairedResultsError",
    "UnsafeCheckpointError",
    "UnsupportedArchitectureError",
    "WeightsFormatError",
    "ZeroShotTaskError",
    "ZeroShotTooWeakError",
    "EvalResult",
    "Evaluator",
    "Ingredient",
    "Soup",
    "SoupBuilder",
    "as_scorer",
    "ZeroShotTask",
    "check_compatible",
    "choose_wise_ft",
    "load_model",
    "merge",
    "holm_adjust",
    "paired_comparison",
    "patch",
    "sweep",
    "weighted_state_dict",
    "wise_ft",
]
