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


class UnsupportedArchitectureError(HfSoupsError, ValueError):
    """A checkpoint's architecture is neither an hf_soups nor a transformers model class."""


class RecipeError(HfSoupsError, ValueError):
    """A recipe (YAML or ``soup.json``) is malformed: unknown keys, wrong types, bad values."""


class CallbackConflictError(HfSoupsError, ValueError):
    """Two Trainer callbacks would undo each other (both load their weights at the end)."""


class HubPushError(HfSoupsError):
    """A push to the Hub failed (offline, refused, or the folder would leak the token)."""


class ZeroShotTooWeakError(HfSoupsError):
    """Pre-training left the zero-shot classifier too close to chance to fine-tune from."""


class UnpairedResultsError(HfSoupsError, ValueError):
    """Two results compared example by example were not computed on the same examples."""


class OutputOverlapsInputError(HfSoupsError, ValueError):
    """The output folder is, contains or lies inside an input (or the Hub cache): refused."""


class ZeroShotTaskError(HfSoupsError, ValueError):
    """A zero-shot task is malformed, or a CLIP model needs one (or its text model) to score."""


class LabelMismatchError(HfSoupsError, ValueError):
    """A dataset's class names differ from the model's labels or the task's class names."""


class WeightsFormatError(HfSoupsError, ValueError):
    """`weights_format` names a format the checkpoint does not hold (or no known format)."""
