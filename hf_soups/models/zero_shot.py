"""Zero-shot classification heads built from class names and prompt templates.

This follows `get_zeroshot_classifier` of mlfoundations/wise-ft and model-soups: for each class,
every template is filled with the class name and encoded by the text tower; each embedding is
L2-normalised, the embeddings are averaged and the mean is renormalised. The class embeddings are
stacked into a ``[num_classes, embed_dim]`` matrix and multiplied by the model's logit scale
(``exp`` of the learned log scale), so ``head @ normalize(image_features)`` gives CLIP's logits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

Template = str | Callable[[str], str]
"""A prompt template: a format string with ``{}`` (or ``{classname}``), or a callable."""

__all__ = [
    "Template",
    "build_zero_shot_head",
    "check_classnames",
    "fill_templates",
    "normalize_features",
]


def normalize_features(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise feature vectors along the last dimension, as CLIP does before its logits."""
    return F.normalize(features, dim=-1)


def check_classnames(classnames: Sequence[str]) -> list[str]:
    """Return `classnames` as a list, rejecting empty or duplicated names.

    Duplicates would collide in ``label2id`` and make two rows of the head identical.
    """
    names = list(classnames)
    if not names:
        raise ValueError("`classnames` is empty: a zero-shot head needs at least one class")
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"class name {name!r} in `classnames` is not a string")
        if name in seen:
            raise ValueError(f"class name {name!r} appears more than once in `classnames`")
        seen.add(name)
    return names


def fill_templates(classname: str, templates: Sequence[Template]) -> list[str]:
    """Fill every template with `classname`.

    String templates are filled with ``str.format`` (``"a photo of a {}."`` or
    ``"a photo of a {classname}."``); callables (the lambdas of the wise-ft template lists) are
    called with the class name.
    """
    if not templates:
        raise ValueError("`templates` is empty: a zero-shot head needs at least one template")
    prompts = []
    for template in templates:
        if callable(template):
            prompt = template(classname)
        elif isinstance(template, str):
            # A template without a placeholder gives every class the same prompt, hence identical
            # head rows; that is a mistake in the template list, not a usable head.
            if "{}" not in template and "{classname}" not in template:
                raise ValueError(
                    f"template {template!r} has no '{{}}' or '{{classname}}' placeholder "
                    "for the class name"
                )
            prompt = template.format(classname, classname=classname)
        else:
            raise TypeError(f"template {template!r} is neither a string nor a callable")
        prompts.append(prompt)
    return prompts


@torch.no_grad()
def build_zero_shot_head(
    encode_text: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    logit_scale: torch.Tensor | float,
    *,
    progress: bool = True,
) -> torch.Tensor:
    """Build a zero-shot classification head.

    Args:
        encode_text: maps a list of prompts to their text embeddings, shape ``[len(prompts), d]``
            (the text tower with its projection; the caller handles tokenisation and devices).
        classnames: one name per class, in label order.
        templates: prompt templates, see :func:`fill_templates`.
        logit_scale: the model's learned *log* logit scale (CLIP's ``logit_scale`` parameter);
            the head is multiplied by its exponential.
        progress: show a progress bar over classes.

    Returns:
        A float32 tensor of shape ``[num_classes, d]``, on the device of the text embeddings, to
        be used as the weight of a bias-free linear layer applied to L2-normalised image features.
    """
    names = check_classnames(classnames)
    rows = []
    for classname in tqdm(names, desc="zero-shot head", disable=not progress):
        embeddings = encode_text(fill_templates(classname, templates)).float()
        embeddings = normalize_features(embeddings)
        rows.append(normalize_features(embeddings.mean(dim=0)))
    head = torch.stack(rows, dim=0)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=head.device).exp()
    logger.debug("built a zero-shot head for %d classes, logit scale %.4g", len(names), scale)
    return head * scale
