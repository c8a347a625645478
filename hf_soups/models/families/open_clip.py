"""open_clip repos: ``open_clip_config.json`` + ``open_clip_model.safetensors``.

As open_clip's ``push_to_hf_hub`` writes them (the laion repos also hold
``open_clip_pytorch_model.bin``, read only behind ``allow_pickle``). Scored through a
:class:`~hf_soups.models.task.ZeroShotTask` with the model's own text tower; merged folders keep
the layout, so ``open_clip.create_model_and_transforms("hf-hub:org/name")`` loads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_soups.models.families.base import (
    OPEN_CLIP_CONFIG,
    CardMetadata,
    CheckpointFiles,
    ModelFamily,
)
from hf_soups.models.task import ZeroShotTask


class OpenCLIPFamily(ModelFamily):
    name = "open_clip"
    weights_format = "open_clip"
    config_file = OPEN_CLIP_CONFIG
    weight_groups = ("open_clip_model",)
    pickle_files = ("open_clip_pytorch_model.bin",)

    def matches(self, files: CheckpointFiles) -> bool:
        return files.open_clip_config is not None

    def load_classifier(
        self,
        folder: str | os.PathLike,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        task: ZeroShotTask | None = None,
        *,
        trust_remote_code: bool = False,
    ) -> nn.Module:
        """The open_clip model with a head from its own text tower, or the bare open_clip model
        when no task is given (and the folder holds no hf_soups head)."""
        from hf_soups.models.labels import check_task_matches
        from hf_soups.models.open_clip import OpenCLIPZeroShotClassifier, load_open_clip

        folder = Path(folder)
        model = load_open_clip(folder, state_dict)
        if isinstance(model, OpenCLIPZeroShotClassifier):
            if task is not None:
                check_task_matches(model.label_names, task, model_name="open_clip classifier")
            return model
        if task is None:
            return model
        config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
        return OpenCLIPZeroShotClassifier.from_open_clip(
            model,
            self.load_tokenizer(folder),
            task.classnames,
            task.templates,
            model_cfg=config["model_cfg"],
            progress=False,
        ).eval()

    def load_tokenizer(self, folder: str | os.PathLike) -> Any:
        import open_clip

        return open_clip.get_tokenizer(f"local-dir:{Path(folder)}")

    def architecture_key(self, config: Mapping[str, Any]) -> tuple:
        return ("open_clip", json.dumps(config.get("model_cfg"), sort_keys=True))

    def card_metadata(self, repo_id: str, task: ZeroShotTask | None = None) -> CardMetadata:
        labels = list(task.classnames) if task is not None else ["cat", "dog"]
        template = task.templates[0] if task is not None else "a photo of a {}."
        snippet = (
            "import open_clip\nimport torch\n\n"
            "model, _, preprocess = open_clip.create_model_and_transforms("
            f'"hf-hub:{repo_id}")\n'
            f'tokenizer = open_clip.get_tokenizer("hf-hub:{repo_id}")\n'
            f"labels = {labels!r}\n"
            "with torch.no_grad():\n"
            "    image = model.encode_image(preprocess(pil_image).unsqueeze(0))\n"
            f"    text = model.encode_text(tokenizer([{template!r}.format(l) for l in labels]))\n"
            "    image = image / image.norm(dim=-1, keepdim=True)\n"
            "    text = text / text.norm(dim=-1, keepdim=True)\n"
            "    logits = model.logit_scale.exp() * image @ text.T\n"
        )
        return CardMetadata("open_clip", "zero-shot-image-classification", False, snippet)


class HfSoupsOpenCLIPClassifierFamily(OpenCLIPFamily):
    """open_clip folders with hf_soups' linear head (``classifier.safetensors``), as
    :class:`~hf_soups.models.open_clip.OpenCLIPZeroShotClassifier` saves them."""

    name = "hf_soups_open_clip_classifier"
    weight_groups = ("open_clip_model", "classifier")

    def matches(self, files: CheckpointFiles) -> bool:
        from hf_soups.models.open_clip import CLASSIFIER_FILE

        return files.open_clip_config is not None and (
            CLASSIFIER_FILE in files.names or "hf_soups" in files.open_clip_config
        )

    def card_metadata(self, repo_id: str, task: ZeroShotTask | None = None) -> CardMetadata:
        snippet = (
            "import torch\n"
            "from hf_soups.models import load_model\n\n"
            f'model = load_model("{repo_id}")  # open_clip + hf_soups head, needs hf_soups\n'
            "with torch.no_grad():\n"
            "    logits = model(pixel_values=pixel_values).logits\n"
        )
        return CardMetadata("open_clip", None, True, snippet)
