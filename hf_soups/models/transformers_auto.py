"""transformers models (ViT, any ``*ForImageClassification``, our CLIP classifier) from a folder.

The class comes from ``config.json``'s ``architectures``: hf_soups' own classes first, then the
transformers class of that name. Code shipped inside a checkpoint (``auto_map``) only runs when
the caller passes ``trust_remote_code=True``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel

from hf_soups.errors import (
    CorruptedCheckpointError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
)
from hf_soups.models.clip import CLIPZeroShotClassifier

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "UnsupportedArchitectureError",
    "load_pretrained",
    "load_transformers_model",
    "resolve_architecture",
]

CONFIG_FILE = "config.json"

# Classes defined by hf_soups, found by the name save_pretrained records in `architectures`.
_OWN_CLASSES: dict[str, type[PreTrainedModel]] = {
    CLIPZeroShotClassifier.__name__: CLIPZeroShotClassifier,
}


def _read_config(folder: Path) -> dict[str, Any]:
    from hf_soups.models.families.base import CheckpointFiles

    config = CheckpointFiles.read(folder).config
    if config is None:
        raise CorruptedCheckpointError(f"{folder}: no {CONFIG_FILE}")
    return config


def _remote_class_reference(config: Mapping[str, Any], architecture: str) -> str | None:
    auto_map = config.get("auto_map") or {}
    references = [ref for key, ref in auto_map.items() if key.startswith("AutoModel")]
    # auto_map values are "module.Class" (or ["module.Class", tokenizer] lists for tokenizers).
    references = [ref for ref in references if isinstance(ref, str)]
    for reference in references:
        if reference.split("--")[-1].rsplit(".", 1)[-1] == architecture:
            return reference
    return references[0] if references else None


def resolve_architecture(
    folder: str | os.PathLike, *, trust_remote_code: bool = False
) -> type[PreTrainedModel]:
    """The model class named by ``folder/config.json``'s first ``architectures`` entry.

    Raises:
        UnsafeCheckpointError: the architecture is code shipped in the checkpoint (``auto_map``)
            and `trust_remote_code` is off.
        UnsupportedArchitectureError: the name is not a class hf_soups or transformers knows.
    """
    folder = Path(folder)
    config = _read_config(folder)
    architectures = config.get("architectures") or []
    if not architectures:
        raise UnsupportedArchitectureError(
            f"{folder / CONFIG_FILE}: no 'architectures' entry, so the model class is unknown"
        )
    name = architectures[0]
    if name in _OWN_CLASSES:
        return _OWN_CLASSES[name]
    reference = _remote_class_reference(config, name)
    if reference is not None:
        if not trust_remote_code:
            raise UnsafeCheckpointError(
                f"{folder}: architecture {name!r} is defined by code inside the checkpoint "
                f"({reference!r} in auto_map); running it needs trust_remote_code=True"
            )
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        logger.warning("Running code from %s for architecture %s (trust_remote_code)", folder, name)
        return get_class_from_dynamic_module(reference, str(folder))
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise UnsupportedArchitectureError(
            f"{folder / CONFIG_FILE}: architecture {name!r} is not a transformers model class "
            f"(transformers {transformers.__version__}) nor one of hf_soups' "
            f"({', '.join(sorted(_OWN_CLASSES))})"
        )
    return cls


def load_transformers_model(
    folder: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load the transformers model of ``folder`` (the class its config names), optionally with
    other weights; see :func:`load_pretrained`."""
    cls = resolve_architecture(folder, trust_remote_code=trust_remote_code)
    return load_pretrained(cls, folder, state_dict, trust_remote_code=trust_remote_code)


def load_pretrained(
    cls: type[PreTrainedModel],
    folder: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load ``cls`` from ``folder`` in eval mode, optionally with other weights.

    Args:
        cls: the transformers model class.
        folder: a transformers model folder (``config.json`` + safetensors weights).
        state_dict: weights keyed as in the safetensors files (as merged by hf_soups), used
            instead of the folder's. They go through transformers' loading, which renames on-disk
            keys to the in-memory ones (ViT, for one, stores other names than it uses), and
            must cover the model exactly.
        trust_remote_code: allow code shipped in the checkpoint to run.

    Raises:
        CorruptedCheckpointError: `state_dict` lacks tensors the model needs or has extra ones.
    """
    folder = Path(folder)
    if state_dict is None:
        # use_safetensors=True: never unpickle a checkpoint's weights.
        return cls.from_pretrained(
            folder, use_safetensors=True, trust_remote_code=trust_remote_code
        ).eval()
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model, info = cls.from_pretrained(
        None, config=config, state_dict=dict(state_dict), output_loading_info=True
    )
    problems = {
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": sorted(key for key, *_ in info["mismatched_keys"]),
    }
    if any(problems.values()):
        details = "; ".join(
            f"{kind} {keys[:3]}{'...' if len(keys) > 3 else ''}"
            for kind, keys in problems.items()
            if keys
        )
        raise CorruptedCheckpointError(
            f"state dict does not fit the {cls.__name__} of {folder}: {details}"
        )
    return model.eval()
