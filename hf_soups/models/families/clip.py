"""transformers ``CLIPModel`` repos, laid out as the openai ones are.

``config.json`` (``architectures: ["CLIPModel"]``, ``model_type: clip``), ``model.safetensors``
(beside ``pytorch_model.bin``, ``tf_model.h5`` and ``flax_model.msgpack``, which are never read
nor fetched), ``preprocessor_config.json`` and the tokenizer files. A CLIPModel has no
classification head: it is scored through a :class:`~hf_soups.models.task.ZeroShotTask` whose
head comes from the model's own text tower, exactly what
``pipeline("zero-shot-image-classification")`` computes for one template.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from hf_soups.errors import ZeroShotTaskError
from hf_soups.models.families.base import (
    CardMetadata,
    CheckpointFiles,
    TransformersFamily,
)
from hf_soups.models.task import ZeroShotTask

ARCHITECTURE = "CLIPModel"
MODEL_TYPE = "clip"


def load_clip_tokenizer(folder: Path):
    """The tokenizer saved beside a CLIP model, or an error that says what is missing."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ZeroShotTaskError(
            f"{folder}: no usable tokenizer files for the CLIP text tower ({error})"
        ) from None


class CLIPFamily(TransformersFamily):
    name = "clip"

    def matches(self, files: CheckpointFiles) -> bool:
        return files.names_model(ARCHITECTURE, MODEL_TYPE)

    def load_classifier(
        self,
        folder: str | os.PathLike,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        task: ZeroShotTask | None = None,
        *,
        trust_remote_code: bool = False,
    ) -> nn.Module:
        from transformers import CLIPModel

        from hf_soups.models.clip import clip_zero_shot_head
        from hf_soups.models.scoring import ZeroShotScorer
        from hf_soups.models.transformers_auto import load_pretrained

        folder = Path(folder)
        if task is None:
            raise ZeroShotTaskError(
                f"{folder}: a CLIPModel has no classification head; score it with "
                "task=ZeroShotTask(classnames=[...], templates=...)"
            )
        clip = load_pretrained(CLIPModel, folder, state_dict)
        head = clip_zero_shot_head(
            clip, load_clip_tokenizer(folder), task.classnames, task.templates, progress=False
        )
        return ZeroShotScorer(clip.vision_model, clip.visual_projection, head, task.classnames)

    def card_metadata(self, repo_id: str, task: ZeroShotTask | None = None) -> CardMetadata:
        labels = list(task.classnames) if task is not None else ["cat", "dog"]
        template = task.templates[0] if task is not None else "a photo of a {}."
        snippet = (
            "from transformers import pipeline\n\n"
            f'classifier = pipeline("zero-shot-image-classification", model="{repo_id}")\n'
            f'print(classifier(\n    "image.png",\n    candidate_labels={labels!r},\n'
            f"    hypothesis_template={template!r},\n))\n"
        )
        return CardMetadata("transformers", "zero-shot-image-classification", False, snippet)
