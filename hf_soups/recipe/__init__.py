"""Recipes: the typed record of how a model folder was made, and its replay.

:class:`Recipe` is what ``soup.json`` holds (written by every path that makes a model folder),
what model cards render from, and what :func:`replay` turns back into the same weights.
"""

from hf_soups.recipe.replay import replay
from hf_soups.recipe.schema import (
    RECIPE_FILE,
    SCHEMA_VERSION,
    GreedyStep,
    PatchRecord,
    PruningRecipe,
    PruningRecord,
    Recipe,
    Score,
    SoupRecord,
    Source,
)

__all__ = [
    "RECIPE_FILE",
    "SCHEMA_VERSION",
    "GreedyStep",
    "PatchRecord",
    "PruningRecipe",
    "PruningRecord",
    "Recipe",
    "Score",
    "SoupRecord",
    "Source",
    "replay",
]
