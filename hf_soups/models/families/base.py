"""What a model family is: its files, its config, how it loads as a classifier, its card metadata.

:class:`CheckpointFiles` is the one place a folder's file names and config files are read;
every family decides from it whether the folder is one of its checkpoints. A family is a
:class:`ModelFamily` subclass in its own module, listed once in
:data:`hf_soups.models.families.FAMILIES`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from hf_soups.checkpoint_files import read_json_object, readable_roots
from hf_soups.models.task import ZeroShotTask

__all__ = [
    "CONFIG_FILES",
    "OPEN_CLIP_CONFIG",
    "TRANSFORMERS_CONFIG",
    "CardMetadata",
    "CheckpointFiles",
    "ModelFamily",
    "TransformersFamily",
    "group_patterns",
]

TRANSFORMERS_CONFIG = "config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
CONFIG_FILES = (TRANSFORMERS_CONFIG, OPEN_CLIP_CONFIG)


@dataclass(frozen=True)
class CheckpointFiles:
    """A folder's top-level file names and its parsed config files, read once.

    Attributes:
        folder: the checkpoint folder.
        names: the names of its top-level files.
        config: ``config.json`` (transformers), or None when absent.
        open_clip_config: ``open_clip_config.json`` (open_clip), or None when absent.
    """

    folder: Path
    names: frozenset[str]
    config: dict[str, Any] | None
    open_clip_config: dict[str, Any] | None

    @classmethod
    def read(cls, folder: str | os.PathLike) -> CheckpointFiles:
        folder = Path(folder)
        # Every entry but folders: a FIFO or socket named like a weights file must be seen (and
        # refused when opened), not silently skipped.
        names = frozenset(p.name for p in folder.iterdir() if not p.is_dir())
        roots = readable_roots(folder)
        configs = {
            name: read_json_object(folder / name, roots) if name in names else None
            for name in CONFIG_FILES
        }
        return cls(folder, names, configs[TRANSFORMERS_CONFIG], configs[OPEN_CLIP_CONFIG])

    @property
    def holds_both_formats(self) -> bool:
        """Both a transformers and an open_clip config (the laion CLIP repos)."""
        return self.config is not None and self.open_clip_config is not None

    @property
    def architecture(self) -> str | None:
        """The first ``architectures`` entry of ``config.json``, if any."""
        architectures = (self.config or {}).get("architectures") or []
        return str(architectures[0]) if architectures else None

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    def names_model(self, architecture: str, model_type: str) -> bool:
        """Whether ``config.json`` names this transformers class (or, when it names no class,
        this ``model_type``)."""
        if self.config is None:
            return False
        if self.architecture is not None:
            return self.architecture == architecture
        return self.model_type == model_type


def group_patterns(group: str) -> tuple[str, ...]:
    """File-name globs of a safetensors weights group: single file, shards, shard index."""
    return (
        f"{group}.safetensors",
        f"{group}-*-of-*.safetensors",
        f"{group}.safetensors.index.json",
    )


@dataclass(frozen=True)
class CardMetadata:
    """What a model card's front matter and usage section say about a family.

    Attributes:
        library_name: the Hub's ``library_name`` (``transformers``, ``open_clip``).
        pipeline_tag: the task a plain library loads the folder for, or None where no pipeline
            would load it correctly.
        needs_hf_soups: loading the folder as a classifier needs hf_soups.
        snippet: Python code that loads the folder and classifies (``{repo_id}`` filled in).
    """

    library_name: str | None
    pipeline_tag: str | None
    needs_hf_soups: bool
    snippet: str | None


class ModelFamily(ABC):
    """One checkpoint layout: how it is recognised, indexed, fetched, loaded and described.

    Subclasses set the class attributes and implement :meth:`matches` and
    :meth:`load_classifier`.
    """

    name: ClassVar[str]
    """Registry name (``"clip"``, ``"clip_vision"``, ``"open_clip"``, ...)."""
    weights_format: ClassVar[str]
    """``"transformers"`` or ``"open_clip"``: the format a repo holding both is read in."""
    config_file: ClassVar[str]
    """The config file that describes the model."""
    weight_groups: ClassVar[tuple[str, ...]]
    """Safetensors weight groups (``model`` for ``model.safetensors`` and its shards)."""
    pickle_files: ClassVar[tuple[str, ...]]
    """Globs of the pickle weights, used only behind ``allow_pickle``."""

    @abstractmethod
    def matches(self, files: CheckpointFiles) -> bool:
        """Whether `files` are a checkpoint of this family (given its format was chosen)."""

    @abstractmethod
    def load_classifier(
        self,
        folder: str | os.PathLike,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        task: ZeroShotTask | None = None,
        *,
        trust_remote_code: bool = False,
    ) -> nn.Module:
        """A scoring classifier (``model(pixel_values=x)`` gives logits) from `folder`.

        `state_dict` (keyed as on disk) replaces the folder's weights; `task` gives class names
        and templates to models without a head. The result has a ``label_names`` attribute.
        """

    @abstractmethod
    def card_metadata(self, repo_id: str, task: ZeroShotTask | None = None) -> CardMetadata:
        """Card metadata for a folder of this family published as `repo_id`."""

    def weight_patterns(self) -> tuple[str, ...]:
        """File-name globs of this family's safetensors weights (and shard indexes)."""
        return tuple(p for group in self.weight_groups for p in group_patterns(group))

    def config_of(self, files: CheckpointFiles) -> dict[str, Any]:
        """This family's config of a folder (``config.json`` or ``open_clip_config.json``)."""
        config = files.config if self.config_file == TRANSFORMERS_CONFIG else files.open_clip_config
        return config or {}

    def load_tokenizer(self, folder: str | os.PathLike) -> Any:
        """The tokenizer saved with the model (transformers' ``AutoTokenizer``; open_clip
        families override it)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)

    def foreign_files(self) -> tuple[str, ...]:
        """Config files of the other weights format, not copied into merged folders: a merge
        of a repo holding both formats holds only the chosen one."""
        other = OPEN_CLIP_CONFIG if self.weights_format == "transformers" else TRANSFORMERS_CONFIG
        return (other,)

    def architecture_key(self, config: Mapping[str, Any]) -> tuple:
        """What must agree between ingredients to be merged (family, type, classes)."""
        return (self.name, config.get("model_type"), tuple(config.get("architectures") or ()))

    def __repr__(self) -> str:
        return f"<model family {self.name!r}>"


class TransformersFamily(ModelFamily):
    """A layout of transformers' own: ``config.json`` and ``model.safetensors`` (or its shards),
    with ``pytorch_model.bin`` pickles read only behind ``allow_pickle``."""

    weights_format = "transformers"
    config_file = TRANSFORMERS_CONFIG
    weight_groups = ("model",)
    pickle_files = (
        "pytorch_model.bin",
        "pytorch_model-*-of-*.bin",
        "pytorch_model.bin.index.json",
    )
