"""The in-memory classifier that scores a CLIP image tower with a zero-shot head.

:class:`ZeroShotScorer` is what :func:`hf_soups.models.load_model` returns for ``CLIPModel`` and
``CLIPVisionModel`` folders: the folder's image tower and visual projection, and a head built
from class names and templates. It exists only to score; it is never saved. Merged folders keep
the ingredients' own layout, which transformers loads without hf_soups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from hf_soups.models.zero_shot import normalize_features

__all__ = ["ZeroShotScorer"]


class ZeroShotScorer(nn.Module):
    """``logits = head @ normalize(visual_projection(vision_model(x).pooler_output))``.

    The logit scale is folded into `head` (as :func:`build_zero_shot_head` builds it), so the
    logits are CLIP's ``logits_per_image`` for one prompt per class.

    Args:
        vision_model: a transformers CLIP vision tower (``CLIPModel.vision_model`` or a
            ``CLIPVisionModel``) whose output has a ``pooler_output``.
        visual_projection: the bias-free projection into the joint embedding space.
        head: ``[num_classes, projection_dim]`` zero-shot head.
        label_names: one class name per row of `head`.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        visual_projection: nn.Module,
        head: torch.Tensor,
        label_names: Sequence[str],
    ) -> None:
        super().__init__()
        if head.shape[0] != len(label_names):
            raise ValueError(f"head has {head.shape[0]} rows for {len(label_names)} label names")
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.register_buffer("head", head.detach().clone())
        self.label_names = list(label_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ImageClassifierOutput:
        """Logits over ``label_names``; cross-entropy loss when `labels` are given."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        features = normalize_features(self.visual_projection(pooled))
        logits = features @ self.head.to(features.dtype).T
        loss = None if labels is None else F.cross_entropy(logits, labels.to(logits.device))
        return ImageClassifierOutput(loss=loss, logits=logits)
