"""Names of a learned soup's tensors: in memory (what the fit sees) and on disk (what the
streaming engine reads and a recipe replays)."""

from __future__ import annotations

import torch

from hf_soups.errors import HfSoupsError
from hf_soups.ingredients import Ingredient
from hf_soups.methods.per_tensor import PerTensorWeights
from hf_soups.models import ZeroShotTask, load_model


def disk_names(ingredient: Ingredient, task: ZeroShotTask | None = None) -> dict[str, str]:
    """In-memory parameter name -> on-disk tensor name, for the ingredient's floating tensors.

    transformers renames some checkpoints' tensors when loading (ViT stores
    ``...attention.attention.query`` but builds ``...attention.q_proj``). The mapping is read off
    the loading itself: every on-disk tensor is filled with its own marker value (distinct among
    tensors of one shape) and loaded, and each in-memory tensor names the marker it received.
    In-memory tensors computed rather than loaded (a zero-shot head built from the text tower)
    hold no marker and are left out.
    """
    groups: dict[tuple[int, ...], list[str]] = {}
    markers = {}
    for name, info in ingredient.tensors.items():
        if info.dtype.is_floating_point:
            group = groups.setdefault(info.shape, [])
            group.append(name)
            markers[name] = torch.full(info.shape, float(len(group)), dtype=torch.float32)
        else:
            markers[name] = ingredient.read(name)
    model = load_model(ingredient, markers, task=task)
    mapping = {}
    for name, tensor in model.state_dict().items():
        candidates = groups.get(tuple(tensor.shape))
        if not tensor.is_floating_point() or not candidates or tensor.numel() == 0:
            continue
        value = tensor.flatten()[0].item()
        index = round(value) - 1
        if value == index + 1 and 0 <= index < len(candidates) and bool((tensor == value).all()):
            mapping[name] = candidates[index]
    return mapping


def per_tensor_method(
    template: Ingredient,
    tensor_weights: dict[str, list[float]],
    model_weights: list[float],
    *,
    task: ZeroShotTask | None = None,
) -> PerTensorWeights:
    """The learned-by-layer coefficients (keyed by in-memory names) as a merge method keyed by
    on-disk names, which the streaming engine runs and a recipe replays. Stored tensors the
    scored model does not hold (a CLIP text tower, when a fixed head scores the image tower)
    were not fitted; they are mixed with the per-model ``model_weights``."""
    names = disk_names(template, task)
    weights = {names[name]: row for name, row in tensor_weights.items() if name in names}
    if not weights:
        raise HfSoupsError(f"{template.name}: no fitted tensor maps to a stored tensor")
    return PerTensorWeights(weights, default=model_weights)
