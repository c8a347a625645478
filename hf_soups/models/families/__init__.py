"""The registry of model families and the one function that tells a folder's family.

Adding a family is one module (a :class:`~hf_soups.models.families.base.ModelFamily` subclass)
plus one entry in :data:`FAMILIES`. Detection reads the folder's file names and config files
once (:class:`~hf_soups.models.families.base.CheckpointFiles`); families are tried in registry
order within the chosen weights format, so specific layouts come before catch-alls.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hf_soups.errors import CorruptedCheckpointError, WeightsFormatError
from hf_soups.models.families.base import (
    CONFIG_FILES,
    OPEN_CLIP_CONFIG,
    TRANSFORMERS_CONFIG,
    CardMetadata,
    CheckpointFiles,
    ModelFamily,
)
from hf_soups.models.families.clip import CLIPFamily
from hf_soups.models.families.clip_vision import CLIPVisionFamily
from hf_soups.models.families.hf_soups_clip import HfSoupsCLIPClassifierFamily
from hf_soups.models.families.image_classifier import ImageClassifierFamily
from hf_soups.models.families.open_clip import HfSoupsOpenCLIPClassifierFamily, OpenCLIPFamily

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILES",
    "DEFAULT_WEIGHTS_FORMAT",
    "FAMILIES",
    "WEIGHTS_FORMATS",
    "CardMetadata",
    "CheckpointFiles",
    "ModelFamily",
    "detect_family",
    "family_of",
    "get_family",
    "is_checkpoint",
]

FAMILIES: tuple[ModelFamily, ...] = (
    HfSoupsCLIPClassifierFamily(),
    CLIPFamily(),
    CLIPVisionFamily(),
    ImageClassifierFamily(),  # any other config.json: keep last among transformers families
    HfSoupsOpenCLIPClassifierFamily(),
    OpenCLIPFamily(),
)
WEIGHTS_FORMATS = ("transformers", "open_clip")
DEFAULT_WEIGHTS_FORMAT = "transformers"
"""The format read from repos holding both (the laion CLIP repos), unless the user chooses."""

_announced_default: set[Path] = set()


def get_family(name: str) -> ModelFamily:
    """The registered family called `name`."""
    for family in FAMILIES:
        if family.name == name:
            return family
    known = ", ".join(f.name for f in FAMILIES)
    raise KeyError(f"no model family {name!r} (registered: {known})")


def _choose_format(files: CheckpointFiles, weights_format: str | None) -> str | None:
    available = [
        fmt
        for fmt, config in zip(WEIGHTS_FORMATS, (files.config, files.open_clip_config))
        if config is not None
    ]
    if weights_format is not None:
        if weights_format not in WEIGHTS_FORMATS:
            raise WeightsFormatError(
                f"weights_format={weights_format!r}: expected one of {', '.join(WEIGHTS_FORMATS)}"
            )
        if weights_format not in available:
            raise WeightsFormatError(
                f"{files.folder}: weights_format={weights_format!r}, but it holds "
                f"{' and '.join(available) or 'no'} checkpoint config "
                f"({TRANSFORMERS_CONFIG} / {OPEN_CLIP_CONFIG})"
            )
        return weights_format
    if len(available) < 2:
        return available[0] if available else None
    if files.folder not in _announced_default:
        _announced_default.add(files.folder)
        logger.info(
            "%s holds both transformers and open_clip weights; reading the %s ones "
            "(pass weights_format='open_clip' for the others)",
            files.folder,
            DEFAULT_WEIGHTS_FORMAT,
        )
    return DEFAULT_WEIGHTS_FORMAT


def family_of(files: CheckpointFiles, weights_format: str | None = None) -> ModelFamily | None:
    """The family of already-read `files`, or None when the folder has no config file."""
    chosen = _choose_format(files, weights_format)
    if chosen is None:
        return None
    for family in FAMILIES:
        if family.weights_format == chosen and family.matches(files):
            return family
    raise CorruptedCheckpointError(f"{files.folder}: no model family reads its {chosen} layout")


def detect_family(folder: str | os.PathLike, *, weights_format: str | None = None) -> ModelFamily:
    """The model family of a checkpoint folder, from its files and config.

    Args:
        folder: a local checkpoint folder.
        weights_format: ``"transformers"`` or ``"open_clip"`` for folders holding both (the
            laion CLIP repos); default :data:`DEFAULT_WEIGHTS_FORMAT`, logged once per folder.

    Raises:
        CorruptedCheckpointError: the folder has neither ``config.json`` nor
            ``open_clip_config.json``.
        WeightsFormatError: `weights_format` names a format the folder does not hold.
    """
    files = CheckpointFiles.read(folder)
    family = family_of(files, weights_format)
    if family is None:
        raise CorruptedCheckpointError(
            f"{folder}: neither {TRANSFORMERS_CONFIG} (transformers) nor {OPEN_CLIP_CONFIG} "
            "(open_clip)"
        )
    return family


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a checkpoint folder of some family (it has a config file)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in CONFIG_FILES)
