"""Everything a card says that depends on the model family: library, pipeline tag, and how to
load the folder.

:func:`family_metadata` is the one place; it will be replaced by the model-family registry
(``hf_soups.models.families``: ``detect_family(folder).card_metadata(repo_id, task)``), whose
``CardMetadata`` has the same fields as :class:`FamilyCard`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_soups.recipe.schema import Recipe

logger = logging.getLogger(__name__)

TRANSFORMERS_CONFIG = "config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# hf_soups' linear head on an open_clip model (OpenCLIPZeroShotClassifier).
OPEN_CLIP_HEAD = "classifier.safetensors"
# Classes only hf_soups defines: transformers' Auto classes would load them wrongly.
HF_SOUPS_CLASSES = ("CLIPZeroShotClassifier",)
ZERO_SHOT = "zero-shot-image-classification"


@dataclass(frozen=True)
class FamilyCard:
    """What a card's metadata and usage section say about the folder's model family.

    Attributes:
        library_name: the Hub's ``library_name`` (``transformers``, ``open_clip``), if known.
        pipeline_tag: the task a plain library loads the folder for; ``None`` where no pipeline
            would load it correctly.
        needs_hf_soups: loading the folder as a classifier needs hf_soups.
        snippet: Python code that loads the folder and classifies, if the family is known.
    """

    library_name: str | None
    pipeline_tag: str | None
    needs_hf_soups: bool
    snippet: str | None


def read_config(folder: Path) -> tuple[str | None, dict[str, Any]]:
    """``(file name, parsed config)`` of a model folder; ``(None, {})`` without a readable one."""
    for name in (OPEN_CLIP_CONFIG, TRANSFORMERS_CONFIG):
        file = folder / name
        if file.is_file():
            try:
                config = json.loads(file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                logger.warning("%s: not valid JSON; the card names no library", file)
                return None, {}
            return name, config if isinstance(config, dict) else {}
    return None, {}


def architecture(folder: Path) -> str | None:
    """The model class (or open_clip model) the folder holds, for the card's summary."""
    name, config = read_config(folder)
    if name == OPEN_CLIP_CONFIG:
        model = config.get("model_name") or config.get("model_cfg")
        return f"open_clip {model}" if isinstance(model, str) else "open_clip CLIP"
    architectures = config.get("architectures") or []
    return str(architectures[0]) if architectures else config.get("model_type")


def family_metadata(folder: Path, recipe: Recipe, repo_id: str) -> FamilyCard:
    """Library, pipeline tag and loading code of the model in ``folder`` published as
    ``repo_id``; class names and prompts come from ``recipe.task`` when recorded."""
    name, config = read_config(folder)
    task = recipe.task or {}
    templates = task.get("templates")
    fill = {  # what the snippets name; each takes the fields it needs
        "repo_id": repo_id,
        "labels": list(task.get("classnames") or ["cat", "dog"]),
        # Without a recorded task the class names are an example, and the snippet says so.
        "example": "" if task.get("classnames") else "  # an example: give your class names",
        "template": templates[0]
        if isinstance(templates, list) and templates
        else "a photo of a {}.",
        "text_model": task.get("text_model") or "<the pre-trained CLIP it was fine-tuned from>",
    }
    architectures = [str(a) for a in config.get("architectures") or []]
    if name == OPEN_CLIP_CONFIG and (folder / OPEN_CLIP_HEAD).is_file():
        return FamilyCard("open_clip", None, True, _HF_SOUPS_SNIPPET.format(**fill))
    if name == OPEN_CLIP_CONFIG:
        return FamilyCard("open_clip", ZERO_SHOT, False, _OPEN_CLIP_SNIPPET.format(**fill))
    if name is None:
        return FamilyCard(None, None, False, None)
    if any(a in HF_SOUPS_CLASSES for a in architectures):
        return FamilyCard("transformers", None, True, _HF_SOUPS_SNIPPET.format(**fill))
    if "CLIPModel" in architectures:
        return FamilyCard("transformers", ZERO_SHOT, False, _CLIP_SNIPPET.format(**fill))
    if "CLIPVisionModel" in architectures:
        return FamilyCard("transformers", None, False, _CLIP_VISION_SNIPPET.format(**fill))
    if any(a.endswith("ForImageClassification") for a in architectures):
        return FamilyCard(
            "transformers", "image-classification", False, _PIPELINE_SNIPPET.format(**fill)
        )
    return FamilyCard("transformers", None, False, None)


_HF_SOUPS_SNIPPET = """\
import torch
from hf_soups.models import load_model

model = load_model("{repo_id}")  # a class of hf_soups: transformers alone loads it wrongly
with torch.no_grad():
    logits = model(pixel_values=pixel_values).logits
"""

_PIPELINE_SNIPPET = """\
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo_id}")
print(classifier("image.png"))
"""

_CLIP_SNIPPET = """\
from transformers import pipeline

classifier = pipeline("zero-shot-image-classification", model="{repo_id}")
labels = {labels!r}{example}
print(classifier("image.png", candidate_labels=labels, hypothesis_template={template!r}))
"""

_CLIP_VISION_SNIPPET = """\
import torch
from transformers import AutoProcessor, CLIPModel, CLIPVisionModel

vision = CLIPVisionModel.from_pretrained("{repo_id}")
clip = CLIPModel.from_pretrained("{text_model}")  # the text tower and projections
processor = AutoProcessor.from_pretrained("{text_model}")
labels = {labels!r}{example}
prompts = [{template!r}.format(label) for label in labels]
inputs = processor(text=prompts, images=image, return_tensors="pt", padding=True)
with torch.no_grad():
    text = clip.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
    image = clip.visual_projection(vision(pixel_values=inputs.pixel_values).pooler_output)
    text, image = text / text.norm(dim=-1, keepdim=True), image / image.norm(dim=-1, keepdim=True)
    logits = clip.logit_scale.exp() * image @ text.T
print(labels[logits.argmax(-1).item()])
"""

_OPEN_CLIP_SNIPPET = """\
import open_clip
import torch

model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{repo_id}")
tokenizer = open_clip.get_tokenizer("hf-hub:{repo_id}")
labels = {labels!r}{example}
with torch.no_grad():
    image = model.encode_image(preprocess(pil_image).unsqueeze(0))
    text = model.encode_text(tokenizer([{template!r}.format(label) for label in labels]))
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * image @ text.T
"""
