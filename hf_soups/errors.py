"""Exceptions raised by hf_soups.

Every message names the culprit: the ingredient, file, tensor or argument at fault.
"""


class HfSoupsError(Exception):
    """Base class of every error hf_soups raises on bad input."""


class IngredientNotFoundError(HfSoupsError):
    """A source is neither a local folder nor a resolvable Hub repository."""


class CorruptedCheckpointError(HfSoupsError):
    """A safetensors file is truncated, malformed, or disagrees with its index."""


class UnsafeCheckpointError(HfSoupsError):
    """A checkpoint has only pickle weights and `allow_pickle` was not given."""


class IncompatibleIngredientsError(HfSoupsError):
    """Ingredients differ in architecture, tensor names, shapes or dtypes."""


class NonFiniteWeightsError(HfSoupsError):
    """A tensor holds NaN or infinite values."""


class InvalidWeightsError(HfSoupsError, ValueError):
    """Mixing weights do not fit the ingredients (count, sign, non-finite values)."""


class OutputExistsError(HfSoupsError, FileExistsError):
    """The output folder exists and is not empty, and `overwrite` was not given."""


class MissingBaseError(HfSoupsError, ValueError):
    """A merge method needs a base (pre-trained) model and none was given."""


class RecipeError(HfSoupsError, ValueError):
    """A recipe (YAML or ``soup.json``) is malformed: unknown keys, wrong types, bad values."""


class CallbackConflictError(HfSoupsError, ValueError):
    """Two Trainer callbacks would undo each other (both load their weights at the end)."""
