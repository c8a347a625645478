"""Model families: how each is loaded from a folder and used as an image classifier.

One module per family: :mod:`~hf_soups.models.clip` (transformers CLIP with a zero-shot head),
:mod:`~hf_soups.models.open_clip` (open_clip, in its Hub folder layout) and
:mod:`~hf_soups.models.transformers_auto` (ViT and any transformers class named in
``config.json``); :mod:`~hf_soups.models.zero_shot` builds heads from class names and templates.
:func:`load_model` picks the family from the files of a folder.

Every classifier follows one forward contract (:class:`ImageClassifier`): called as
``model(pixel_values=x)`` it returns the logits ``[batch, num_classes]``, or an object whose
``.logits`` they are (transformers' ``ImageClassifierOutput``); :func:`logits_of` takes either.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from transformers import PreTrainedModel

from hf_soups.errors import CorruptedCheckpointError
from hf_soups.models.clip import CLIPZeroShotClassifier, make_word_tokenizer
from hf_soups.models.open_clip import OpenCLIPZeroShotClassifier, load_open_clip
from hf_soups.models.transformers_auto import (
    UnsupportedArchitectureError,
    load_transformers_model,
    resolve_architecture,
)
from hf_soups.models.zero_shot import Template, build_zero_shot_head, fill_templates

logger = logging.getLogger(__name__)

__all__ = [
    "CLIPZeroShotClassifier",
    "ImageClassifier",
    "OpenCLIPZeroShotClassifier",
    "Template",
    "UnsupportedArchitectureError",
    "build_zero_shot_head",
    "fill_templates",
    "load_model",
    "logits_of",
    "make_word_tokenizer",
    "resolve_architecture",
    "save_model",
]


@runtime_checkable
class ImageClassifier(Protocol):
    """What evaluators and soups call: ``model(pixel_values=x)`` gives logits.

    The result is a ``[batch, num_classes]`` tensor or an object with a ``.logits`` attribute
    holding one (a transformers ``ImageClassifierOutput``).
    """

    def __call__(self, *, pixel_values: torch.Tensor) -> Any: ...


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a classifier's output, whether a tensor or an object with ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"model output of type {type(output).__name__} is neither a tensor nor has a "
            "tensor `.logits`"
        )
    return logits


def _folder(source: Any) -> Path:
    # Ingredients (and anything else with a `.path`) are accepted duck-typed, so this module need
    # not import the ingredient machinery.
    path = getattr(source, "path", None)
    if path is not None:
        return Path(path)
    folder = Path(source)
    if folder.is_dir():
        return folder
    from hf_soups.ingredients import Ingredient

    return Ingredient.from_source(str(source)).path


def load_model(
    source: str | os.PathLike | Any,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load the model of a folder, in eval mode, optionally with other weights.

    Args:
        source: a model folder, a Hub id (``org/name@rev``, resolved through the cache), or an
            ``Ingredient`` (anything with a ``.path``).
        state_dict: weights keyed as on disk (the names in the folder's safetensors files, across
            all of them), for example a soup from ``hf_soups.merge.weighted_state_dict``; used
            instead of the folder's weights and required to fit the model exactly.
        trust_remote_code: allow code shipped in a transformers checkpoint to run.

    The family is read from the folder: ``open_clip_config.json`` gives an open_clip model
    (an :class:`OpenCLIPZeroShotClassifier` when there is a head), ``config.json`` the class its
    ``architectures`` names (:class:`CLIPZeroShotClassifier`, or a transformers class).

    Raises:
        CorruptedCheckpointError: no config file, or weights that do not fit the config.
        UnsupportedArchitectureError: the architecture is unknown to hf_soups and transformers.
        UnsafeCheckpointError: the architecture needs remote code and `trust_remote_code` is off.
    """
    folder = _folder(source)
    if (folder / "open_clip_config.json").is_file():
        model = load_open_clip(folder, state_dict)
    elif (folder / "config.json").is_file():
        model = load_transformers_model(folder, state_dict, trust_remote_code=trust_remote_code)
    else:
        raise CorruptedCheckpointError(
            f"{folder}: neither config.json (transformers) nor open_clip_config.json (open_clip)"
        )
    logger.debug("Loaded %s from %s", type(model).__name__, folder)
    return model.eval()


def save_model(model: nn.Module, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a model so that :func:`load_model` reads it back; written atomically.

    transformers models go through ``save_pretrained``; open_clip classifiers write open_clip's
    folder layout plus their head.
    """
    if isinstance(model, OpenCLIPZeroShotClassifier):
        return model.save_pretrained(folder, overwrite=overwrite)
    if isinstance(model, PreTrainedModel):
        from hf_soups.output import atomic_output_dir

        with atomic_output_dir(folder, overwrite=overwrite) as work_dir:
            model.save_pretrained(work_dir)
        return Path(folder)
    raise TypeError(
        f"cannot save a {type(model).__name__}: expected a transformers PreTrainedModel or an "
        "OpenCLIPZeroShotClassifier (wrap bare open_clip models with "
        "OpenCLIPZeroShotClassifier.from_open_clip)"
    )
