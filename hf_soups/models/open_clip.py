"""open_clip models as zero-shot image classifiers, stored in open_clip's Hub folder layout.

A folder holds ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``, as
open_clip's ``push_to_hf_hub`` writes it), ``open_clip_model.safetensors`` (the open_clip state
dict, untouched, so ``open_clip.create_model("local-dir:<folder>")`` still loads it) and
``classifier.safetensors`` (``classifier.weight``, the zero-shot or fine-tuned head). Class names
live in ``open_clip_config.json`` under the ``"hf_soups"`` key, which open_clip ignores.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from hf_soups.errors import CorruptedCheckpointError
from hf_soups.models.zero_shot import (
    Template,
    build_zero_shot_head,
    check_classnames,
    normalize_features,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIER_FILE",
    "CLASSIFIER_KEY",
    "CONFIG_FILE",
    "MODEL_FILE",
    "OpenCLIPZeroShotClassifier",
    "build_open_clip",
    "load_open_clip",
]

CONFIG_FILE = "open_clip_config.json"
MODEL_FILE = "open_clip_model.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_KEY = "classifier.weight"
_LABELS_KEY = "hf_soups"

OpenCLIPTokenizer = Callable[[list[str]], torch.Tensor]
"""open_clip tokenizers map a list of texts to a ``[n, context_length]`` LongTensor."""


def _read_config(folder: Path) -> dict[str, Any]:
    from hf_soups.models.families.base import CheckpointFiles

    config = CheckpointFiles.read(folder).open_clip_config
    if config is None:
        raise CorruptedCheckpointError(f"{folder}: no {CONFIG_FILE}")
    if not isinstance(config.get("model_cfg"), dict):
        raise CorruptedCheckpointError(f"{folder / CONFIG_FILE}: no 'model_cfg' object")
    return config


def _model_config(model_cfg: Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(model_cfg, str):
        resolved = open_clip.get_model_config(model_cfg)
        if resolved is None:
            raise ValueError(
                f"model_cfg {model_cfg!r} is neither a registered open_clip model name nor a "
                "'local-dir:' folder with an open_clip_config.json"
            )
        return resolved
    return copy.deepcopy(dict(model_cfg))


class _DropRandomInitWarning(logging.Filter):
    # open_clip warns on its root logger that a model built without weights is "initialized
    # randomly"; build_open_clip's callers load the weights right after, so the warning misleads.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def build_open_clip(folder: str | os.PathLike) -> nn.Module:
    """An open_clip model built from ``folder``'s config and preprocessing, weights not loaded."""
    root = logging.getLogger()
    quiet = _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(
            f"local-dir:{Path(folder)}", load_weights=False, pretrained_text=False
        )
    finally:
        root.removeFilter(quiet)


def _split_head(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    model_state = {k: v for k, v in state_dict.items() if k != CLASSIFIER_KEY}
    return model_state, state_dict.get(CLASSIFIER_KEY)


class OpenCLIPZeroShotClassifier(nn.Module):
    """An open_clip CLIP with a linear head over L2-normalised image features.

    ``model(pixel_values=x).logits == classifier(normalize(model.encode_image(x)))``, with the
    logit scale folded into the classifier weight, as in wise-ft.

    Args:
        model: an open_clip ``CLIP`` (or ``CustomTextCLIP``).
        head: ``[num_classes, embed_dim]`` classifier weight.
        classnames: one name per row of `head`.
        model_cfg: the open_clip model config (``open_clip.get_model_config(name)``), written to
            ``open_clip_config.json`` so the folder can be rebuilt.
        preprocess_cfg: image preprocessing; defaults to what open_clip attached to `model`.
    """

    def __init__(
        self,
        model: nn.Module,
        head: torch.Tensor,
        classnames: Sequence[str],
        model_cfg: Mapping[str, Any],
        preprocess_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.model_cfg = copy.deepcopy(dict(model_cfg))
        if preprocess_cfg is None:
            preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
        self.preprocess_cfg = copy.deepcopy(dict(preprocess_cfg))
        self.classifier = nn.Linear(
            head.shape[1], head.shape[0], bias=False, device=head.device, dtype=head.dtype
        )
        self.set_head(head, classnames)

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    @property
    def label_names(self) -> list[str]:
        """Class names in logit order."""
        return [self.id2label[i] for i in range(len(self.id2label))]

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @classmethod
    def from_open_clip(
        cls,
        model: nn.Module,
        tokenizer: OpenCLIPTokenizer,
        classnames: Sequence[str],
        templates: Sequence[Template],
        *,
        model_cfg: Mapping[str, Any] | str,
        progress: bool = True,
    ) -> OpenCLIPZeroShotClassifier:
        """Wrap `model` (not copied) with the zero-shot head of `classnames` and `templates`.

        `model_cfg` is the config `model` was built from, or the open_clip model name
        (``"ViT-B-32"``, ``"local-dir:/path"``) to look it up by.
        """
        names = check_classnames(classnames)
        head = _build_head(model, tokenizer, names, templates, progress=progress)
        dtype = next(model.parameters()).dtype
        return cls(model, head.to(dtype), names, _model_config(model_cfg))

    def build_head(
        self,
        tokenizer: OpenCLIPTokenizer,
        classnames: Sequence[str],
        templates: Sequence[Template],
        *,
        progress: bool = True,
    ) -> torch.Tensor:
        """Zero-shot head ``[num_classes, embed_dim]`` from this model's text tower."""
        return _build_head(self.model, tokenizer, classnames, templates, progress=progress)

    def set_head(self, head: torch.Tensor, classnames: Sequence[str]) -> None:
        """Replace the classifier weight with `head` and the labels with `classnames` (PAINT)."""
        names = check_classnames(classnames)
        weight = self.classifier.weight
        expected = (len(names), weight.shape[1])
        if tuple(head.shape) != expected:
            raise ValueError(
                f"head has shape {tuple(head.shape)}, expected {expected} "
                f"({len(names)} classnames x embed_dim)"
            )
        if weight.shape != head.shape:
            self.classifier = nn.Linear(
                expected[1], expected[0], bias=False, device=weight.device, dtype=weight.dtype
            )
            self.classifier.weight.requires_grad_(weight.requires_grad)
        with torch.no_grad():
            self.classifier.weight.copy_(head)
        self.id2label = dict(enumerate(names))

    def freeze_text_tower(self) -> None:
        """Stop gradients to everything but the image tower and the head.

        In open_clip that is the text transformer, its embeddings and projection, and the logit
        scale (and bias); fine-tuning then leaves them as pre-trained in every ingredient.
        """
        for name, parameter in self.model.named_parameters():
            if not name.startswith("visual."):
                parameter.requires_grad_(False)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ImageClassifierOutput:
        """Logits over ``id2label``; cross-entropy loss when `labels` are given."""
        logits = self.classifier(normalize_features(self.model.encode_image(pixel_values)))
        loss = None if labels is None else F.cross_entropy(logits, labels.to(logits.device))
        return ImageClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the open_clip folder layout (see the module docstring), atomically."""
        from hf_soups.output import atomic_output_dir

        config = {
            "model_cfg": self.model_cfg,
            "preprocess_cfg": self.preprocess_cfg,
            _LABELS_KEY: {"id2label": {str(i): name for i, name in self.id2label.items()}},
        }
        model_state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        head = {CLASSIFIER_KEY: self.classifier.weight.detach().contiguous()}
        with atomic_output_dir(folder, overwrite=overwrite) as work_dir:
            (work_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            save_file(model_state, work_dir / MODEL_FILE, metadata={"format": "pt"})
            save_file(head, work_dir / CLASSIFIER_FILE, metadata={"format": "pt"})
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> OpenCLIPZeroShotClassifier:
        """Load a folder written by :meth:`save_pretrained` (or merged from such folders)."""
        model = load_open_clip(folder)
        if not isinstance(model, cls):
            raise CorruptedCheckpointError(
                f"{folder}: no {CLASSIFIER_KEY!r} tensor, so no classification head to load"
            )
        return model


def _build_head(
    model: nn.Module,
    tokenizer: OpenCLIPTokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    progress: bool,
) -> torch.Tensor:
    device = next(model.parameters()).device

    def encode(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(prompts).to(device))

    was_training = model.training
    model.eval()
    try:
        return build_zero_shot_head(
            encode, classnames, templates, model.logit_scale.detach(), progress=progress
        )
    finally:
        model.train(was_training)


def load_open_clip(
    folder: str | os.PathLike, state_dict: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """Load an open_clip folder: a classifier when it holds a head, else the bare open_clip model.

    Args:
        folder: holds ``open_clip_config.json`` and, unless `state_dict` is given, the weights.
        state_dict: weights keyed as in the folder's safetensors files (the open_clip state dict
            plus ``classifier.weight``), loaded strictly instead of the folder's files.
    """
    folder = Path(folder)
    config = _read_config(folder)
    if state_dict is None:
        from hf_soups.ingredients import Ingredient

        ingredient = Ingredient.from_folder(folder, weights_format="open_clip")
        files = {info.file.name for info in ingredient.tensors.values()}
        head = ingredient.read(CLASSIFIER_KEY) if CLASSIFIER_KEY in ingredient.tensors else None
        if MODEL_FILE in files and files <= {MODEL_FILE, CLASSIFIER_FILE}:
            # open_clip's own loading, which also converts older checkpoint formats; it picks
            # open_clip_model.safetensors over the other files of the folder.
            model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False)
        else:  # sharded or otherwise renamed weights (a large merge, say)
            model = build_open_clip(folder)
            model_state, _ = _split_head(ingredient.state_dict())
            _load_strict(model, model_state, folder)
    else:
        model = build_open_clip(folder)
        model_state, head = _split_head(state_dict)
        _load_strict(model, model_state, folder)
    if head is None:
        logger.info("%s holds no %s; returning the bare open_clip model", folder, CLASSIFIER_KEY)
        return model.eval()
    id2label = config.get(_LABELS_KEY, {}).get("id2label")
    if id2label is None:
        names = [f"LABEL_{i}" for i in range(head.shape[0])]
    elif sorted(id2label) != sorted(str(i) for i in range(head.shape[0])):
        raise CorruptedCheckpointError(
            f"{folder / CONFIG_FILE}: hf_soups.id2label has labels {sorted(id2label)} but "
            f"{CLASSIFIER_KEY!r} has {head.shape[0]} rows"
        )
    else:
        names = [id2label[str(i)] for i in range(head.shape[0])]
    classifier = OpenCLIPZeroShotClassifier(model, head, names, config["model_cfg"])
    return classifier.eval()


def _load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], folder: Path) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CorruptedCheckpointError(
            f"{folder}: weights do not fit its open_clip config: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    model.load_state_dict(state_dict, strict=True)
