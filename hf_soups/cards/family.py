"""What a card says that depends on the model family: library, pipeline tag, how to load it.

The model-family registry knows it (``hf_soups.models.families``: each family's
``card_metadata``); this module only asks it, so a new family needs no change here. The registry
is imported when a card is written, not when this package is imported: reading and checking a
recipe needs no torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hf_soups.cards.sources import is_repo_id
from hf_soups.errors import HfSoupsError
from hf_soups.output import final_name, final_path
from hf_soups.recipe.schema import Recipe

logger = logging.getLogger(__name__)

__all__ = ["architecture", "family_metadata", "folder_metadata"]


def family_metadata(folder: Path, recipe: Recipe, repo_id: str):
    """The :class:`~hf_soups.models.families.CardMetadata` of the model in ``folder`` published
    as ``repo_id`` (a card title that is no repo id loads the folder by its name); class names
    and prompts come from ``recipe.task`` when recorded. A folder no family recognises gets no
    library, pipeline tag or snippet (and a log line)."""
    from hf_soups.models.task import ZeroShotTask

    task = ZeroShotTask.from_dict(recipe.task) if recipe.task else None
    return folder_metadata(folder, repo_id, task)


def folder_metadata(folder: Path, repo_id: str, task=None):
    """:func:`family_metadata` for a folder without a recipe: ``task`` (a
    :class:`~hf_soups.models.ZeroShotTask`) gives the snippet's class names and prompts."""
    from hf_soups.models.families import CardMetadata, detect_family

    if not is_repo_id(repo_id):
        repo_id = final_name(folder)
    try:
        family = detect_family(folder)
    except HfSoupsError as error:
        logger.info("%s: the card names no library (%s)", final_path(folder), error)
        return CardMetadata(None, None, False, None)
    return family.card_metadata(repo_id, task)


def architecture(folder: Path) -> str | None:
    """The model class (or open_clip model) the folder holds, for the card's summary."""
    from hf_soups.models.families import CheckpointFiles

    try:
        files = CheckpointFiles.read(folder)
    except HfSoupsError:
        return None
    if files.open_clip_config is not None and files.config is None:
        model = files.open_clip_config.get("model_name")
        return f"open_clip {model}" if isinstance(model, str) else "open_clip CLIP"
    return files.architecture or files.model_type
