"""hf_soups: model soups, WiSE-FT and weight averaging for the Hugging Face ecosystem."""

from hf_soups.errors import (
    CorruptedCheckpointError,
    HfSoupsError,
    IncompatibleIngredientsError,
    IngredientNotFoundError,
    InvalidWeightsError,
    MissingBaseError,
    NonFiniteWeightsError,
    OutputExistsError,
    UnsafeCheckpointError,
)
from hf_soups.ingredients import Ingredient, check_compatible
from hf_soups.merge import merge, weighted_state_dict

__all__ = [
    "CorruptedCheckpointError",
    "HfSoupsError",
    "IncompatibleIngredientsError",
    "Ingredient",
    "IngredientNotFoundError",
    "InvalidWeightsError",
    "MissingBaseError",
    "NonFiniteWeightsError",
    "OutputExistsError",
    "UnsafeCheckpointError",
    "check_compatible",
    "merge",
    "weighted_state_dict",
]
