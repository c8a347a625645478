"""transformers image classifiers: ViT and any ``*ForImageClassification`` with ``id2label``.

The class is the one ``config.json``'s ``architectures`` names; the folder loads with
``pipeline("image-classification")`` as it is. This is the catch-all family of folders with a
``config.json`` that no more specific family claims.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from hf_soups.models.families.base import (
    CardMetadata,
    CheckpointFiles,
    TransformersFamily,
)
from hf_soups.models.labels import check_task_matches, names_from_id2label
from hf_soups.models.task import ZeroShotTask


def check_task_labels(
    model: nn.Module, names: list[str] | None, task: ZeroShotTask | None
) -> nn.Module:
    """Set ``model.label_names``; a task given for a model with its own head must name the same
    classes in the same order."""
    if task is not None:
        check_task_matches(names, task, model_name=type(model).__name__)
    model.label_names = names
    return model


class ImageClassifierFamily(TransformersFamily):
    name = "image_classifier"

    def matches(self, files: CheckpointFiles) -> bool:
        return files.config is not None

    def load_classifier(
        self,
        folder: str | os.PathLike,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        task: ZeroShotTask | None = None,
        *,
        trust_remote_code: bool = False,
    ) -> nn.Module:
        from hf_soups.models.transformers_auto import load_transformers_model

        model = load_transformers_model(folder, state_dict, trust_remote_code=trust_remote_code)
        return check_task_labels(model, names_from_id2label(model.config.id2label), task)

    def card_metadata(self, repo_id: str, task: ZeroShotTask | None = None) -> CardMetadata:
        snippet = (
            "from transformers import pipeline\n\n"
            f'classifier = pipeline("image-classification", model="{repo_id}")\n'
            'print(classifier("image.png"))\n'
        )
        return CardMetadata("transformers", "image-classification", False, snippet)
