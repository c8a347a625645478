"""hf_soups' own ``CLIPZeroShotClassifier`` folders (a CLIP with a linear head), as older
versions of hf_soups wrote them. They load only with hf_soups, so their cards name no pipeline."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from hf_soups.models.families.base import CardMetadata, CheckpointFiles
from hf_soups.models.families.image_classifier import ImageClassifierFamily, check_task_labels
from hf_soups.models.labels import names_from_id2label
from hf_soups.models.task import ZeroShotTask

ARCHITECTURE = "CLIPZeroShotClassifier"


class HfSoupsCLIPClassifierFamily(ImageClassifierFamily):
    name = "hf_soups_clip_classifier"

    def matches(self, files: CheckpointFiles) -> bool:
        return files.architecture == ARCHITECTURE

    def load_classifier(
        self,
        folder: str | os.PathLike,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        task: ZeroShotTask | None = None,
        *,
        trust_remote_code: bool = False,
    ) -> nn.Module:
        from hf_soups.models.clip import CLIPZeroShotClassifier
        from hf_soups.models.transformers_auto import load_pretrained

        model = load_pretrained(CLIPZeroShotClassifier, folder, state_dict)
        return check_task_labels(model, names_from_id2label(model.config.id2label), task)

    def card_metadata(self, repo_id: str, task: ZeroShotTask | None = None) -> CardMetadata:
        snippet = (
            "import torch\n"
            "from hf_soups.models import load_model\n\n"
            f'model = load_model("{repo_id}")  # CLIPZeroShotClassifier, needs hf_soups\n'
            "with torch.no_grad():\n"
            "    logits = model(pixel_values=pixel_values).logits\n"
        )
        return CardMetadata("transformers", None, True, snippet)
