"""Model families: which files a checkpoint has, how it loads as a classifier, its card metadata.

One module per family under :mod:`hf_soups.models.families` (transformers ``CLIPModel``,
``CLIPVisionModel`` fine-tunes, open_clip, ViT and other transformers classifiers, and hf_soups'
own CLIP classifier folders), registered in :data:`~hf_soups.models.families.FAMILIES`;
:func:`~hf_soups.models.families.detect_family` tells a folder's family from its files.
:func:`load_model` loads any of them as a scoring classifier; CLIP models without a head are
scored through a :class:`ZeroShotTask` (class names and prompt templates).

Every classifier follows one forward contract (:class:`ImageClassifier`): called as
``model(pixel_values=x)`` it returns the logits ``[batch, num_classes]``, or an object whose
``.logits`` they are (transformers' ``ImageClassifierOutput``); :func:`logits_of` takes either.
Its class names are :func:`label_names_of` it (``model.label_names``); :func:`check_labels`
compares them with a dataset's.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from hf_soups.models.families import ModelFamily, detect_family
from hf_soups.models.labels import check_labels, label_names_of
from hf_soups.models.task import ZeroShotTask

if TYPE_CHECKING:
    from hf_soups.models.clip import CLIPZeroShotClassifier, make_word_tokenizer
    from hf_soups.models.open_clip import OpenCLIPZeroShotClassifier
    from hf_soups.models.scoring import ZeroShotScorer
    from hf_soups.models.transformers_auto import (
        UnsupportedArchitectureError,
        resolve_architecture,
    )
    from hf_soups.models.zero_shot import Template, build_zero_shot_head, fill_templates

logger = logging.getLogger(__name__)

# Names defined in modules that import transformers or open_clip, loaded on first use so that
# indexing a checkpoint (which detects its family) does not wait for them.
_LAZY = {
    "CLIPZeroShotClassifier": "hf_soups.models.clip",
    "make_word_tokenizer": "hf_soups.models.clip",
    "OpenCLIPZeroShotClassifier": "hf_soups.models.open_clip",
    "ZeroShotScorer": "hf_soups.models.scoring",
    "UnsupportedArchitectureError": "hf_soups.models.transformers_auto",
    "resolve_architecture": "hf_soups.models.transformers_auto",
    "Template": "hf_soups.models.zero_shot",
    "build_zero_shot_head": "hf_soups.models.zero_shot",
    "fill_templates": "hf_soups.models.zero_shot",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_soups.models' has no attribute {name!r}")


__all__ = [
    "CLIPZeroShotClassifier",
    "ImageClassifier",
    "ModelFamily",
    "OpenCLIPZeroShotClassifier",
    "Template",
    "UnsupportedArchitectureError",
    "ZeroShotScorer",
    "ZeroShotTask",
    "build_zero_shot_head",
    "check_labels",
    "detect_family",
    "fill_templates",
    "label_names_of",
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
    task: ZeroShotTask | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load the model of a checkpoint as a classifier, in eval mode, optionally with other weights.

    Args:
        source: a model folder, a Hub id (``org/name@rev``, resolved through the cache), or an
            ``Ingredient`` (anything with a ``.path``; its chosen weights format is kept).
        state_dict: weights keyed as on disk (the names in the folder's safetensors files, across
            all of them), for example a soup from ``hf_soups.merge.weighted_state_dict``; used
            instead of the folder's weights and required to fit the model exactly.
        task: class names and prompt templates. Required for CLIP models without a head:
            ``CLIPModel`` and open_clip folders get the head from their own text tower,
            ``CLIPVisionModel`` folders from ``task.text_model``. For models with a head (ViT,
            hf_soups' CLIP classifiers) it is optional and must name the same classes.
        trust_remote_code: allow code shipped in a transformers checkpoint to run.

    Returns:
        A module whose ``forward(pixel_values=...)`` gives logits (or an output with
        ``.logits``), with its class names in ``label_names``. For CLIP models this is an
        in-memory scorer (:class:`ZeroShotScorer`), never a format to save: merged folders keep
        their ingredients' layout. An open_clip folder without head, loaded without a task, gives
        the bare open_clip model.

    Raises:
        CorruptedCheckpointError: no config file, or weights that do not fit the config.
        ZeroShotTaskError: a CLIP model without a head and no task (or no ``text_model`` for a
            vision-only one).
        LabelMismatchError: the task's class names differ from the model's own head's.
        UnsupportedArchitectureError: the architecture is unknown to hf_soups and transformers.
        UnsafeCheckpointError: the architecture needs remote code and `trust_remote_code` is off.
    """
    folder = _folder(source)
    family = getattr(source, "family", None) or detect_family(folder)
    if state_dict is None and getattr(source, "pickled", False):
        # Pickle-only ingredients were read with torch.load(weights_only=True) behind the
        # allow_pickle opt-in; transformers is only ever asked to read safetensors.
        state_dict = source.state_dict()
    model = family.load_classifier(folder, state_dict, task, trust_remote_code=trust_remote_code)
    logger.debug("Loaded %s (%s family) from %s", type(model).__name__, family.name, folder)
    return model.eval()


def save_model(model: nn.Module, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a model so that :func:`load_model` reads it back; written atomically.

    transformers models go through ``save_pretrained``; open_clip classifiers write open_clip's
    folder layout plus their head.
    """
    from transformers import PreTrainedModel

    from hf_soups.models.open_clip import OpenCLIPZeroShotClassifier
    from hf_soups.models.scoring import ZeroShotScorer

    if isinstance(model, ZeroShotScorer):
        # Its head and projection come from the task and the text model, not the checkpoint.
        raise TypeError(
            "a ZeroShotScorer only scores and is never saved: write CLIP soups with "
            "Soup.save_pretrained or hf_soups.merge.merge, which keep the ingredients' layout"
        )
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
