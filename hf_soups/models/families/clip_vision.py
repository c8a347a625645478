"""Vision-only CLIP fine-tunes: ``CLIPVisionModel`` repos as fusion_bench publishes them.

``config.json`` with ``architectures: ["CLIPVisionModel"]`` and ``model_type:
clip_vision_model``, one ``model.safetensors`` with ``vision_model.*`` keys. Such a model has no
text tower and no visual projection: as in fusion_bench, its head is built from a pre-trained
``CLIPModel`` (the task's ``text_model``: text tower, text projection, visual projection and
logit scale) and the task's class names and templates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from functools import lru_cache
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

logger = logging.getLogger(__name__)

ARCHITECTURE = "CLIPVisionModel"
MODEL_TYPE = "clip_vision_model"


@lru_cache(maxsize=4)
def _text_side(
    text_folder: str, classnames: tuple[str, ...], templates: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    # The head and visual projection depend on the text model and the task only, so every
    # ingredient (and every candidate soup) of one run shares them: built once, kept.
    from transformers import CLIPModel

    from hf_soups.models.clip import clip_zero_shot_head
    from hf_soups.models.families.clip import load_clip_tokenizer

    folder = Path(text_folder)
    clip = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    head = clip_zero_shot_head(
        clip, load_clip_tokenizer(folder), classnames, templates, progress=False
    )
    logger.info("Built the zero-shot head of %d classes from %s", len(classnames), folder)
    return head, clip.visual_projection.weight.detach().clone()


def _text_model_folder(text_model: str) -> Path:
    from hf_soups.hub import resolve_source
    from hf_soups.models.families import detect_family

    folder, _ = resolve_source(text_model, weights_format="transformers")
    family = detect_family(folder, weights_format="transformers")
    if family.name != "clip":
        raise ZeroShotTaskError(
            f"text_model {text_model!r} is a {family.name!r} checkpoint; it must be a "
            "pre-trained CLIPModel (text tower, projections and logit scale)"
        )
    return folder


class CLIPVisionFamily(TransformersFamily):
    name = "clip_vision"

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
        from transformers import CLIPVisionModel

        from hf_soups.models.scoring import ZeroShotScorer
        from hf_soups.models.transformers_auto import load_pretrained

        folder = Path(folder)
        if task is None or task.text_model is None:
            raise ZeroShotTaskError(
                f"{folder}: a CLIPVisionModel has neither text tower nor head; score it with "
                "task=ZeroShotTask(classnames=[...], text_model=<the pre-trained CLIPModel it "
                "was fine-tuned from, e.g. 'openai/clip-vit-base-patch32'>)"
            )
        vision = load_pretrained(CLIPVisionModel, folder, state_dict)
        head, projection_weight = _text_side(
            str(_text_model_folder(task.text_model)), task.classnames, task.templates
        )
        width = vision.config.hidden_size
        if projection_weight.shape[1] != width:
            raise ZeroShotTaskError(
                f"text_model {task.text_model!r} projects {projection_weight.shape[1]}-wide "
                f"image features, but the vision tower of {folder} is {width} wide: not the "
                "CLIP it was fine-tuned from"
            )
        projection = nn.Linear(width, projection_weight.shape[0], bias=False)
        with torch.no_grad():
            projection.weight.copy_(projection_weight)
        projection.to(dtype=vision.dtype)
        return ZeroShotScorer(vision, projection, head, task.classnames).eval()

    def card_metadata(self, repo_id: str, task: ZeroShotTask | None = None) -> CardMetadata:
        text_model = (task.text_model if task is not None else None) or "<pre-trained CLIP>"
        labels = list(task.classnames) if task is not None else ["cat", "dog"]
        template = task.templates[0] if task is not None else "a photo of a {}."
        snippet = (
            "import torch\n"
            "from transformers import AutoProcessor, CLIPModel, CLIPVisionModel\n\n"
            f'vision = CLIPVisionModel.from_pretrained("{repo_id}")\n'
            f'clip = CLIPModel.from_pretrained("{text_model}")  # text tower and projections\n'
            f'processor = AutoProcessor.from_pretrained("{text_model}")\n'
            f"labels = {labels!r}\n"
            f"prompts = [{template!r}.format(label) for label in labels]\n"
            'inputs = processor(text=prompts, images=image, return_tensors="pt", padding=True)\n'
            "with torch.no_grad():\n"
            "    text = clip.get_text_features(input_ids=inputs.input_ids,\n"
            "                                  attention_mask=inputs.attention_mask).pooler_output\n"
            "    image = clip.visual_projection(vision(pixel_values=inputs.pixel_values).pooler_output)\n"
            "    text = text / text.norm(dim=-1, keepdim=True)\n"
            "    image = image / image.norm(dim=-1, keepdim=True)\n"
            "    logits = clip.logit_scale.exp() * image @ text.T\n"
            "print(labels[logits.argmax(-1).item()])\n"
        )
        # No pipeline tag: a feature-extraction widget would hide that this is a classifier
        # whose head comes from another repository (the snippet shows how to build it).
        return CardMetadata("transformers", None, False, snippet)
