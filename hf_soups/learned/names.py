"""Names of a learned soup's tensors: in memory (what the fit sees) and on disk (what the
streaming engine reads and a recipe replays)."""

from __future__ import annotations

import torch

from hf_soups.errors import HfSoupsError
from hf_soups.ingredients import Ingredient
from hf_soups.methods.per_tensor import PerTensorWeights
from hf_soups.models import load_model


def disk_names(ingredient: Ingredient) -> dict[str, str]:
    """In-memory parameter name -> on-disk tensor name, for the ingredient's floating tensors.

    transformers renames some checkpoints' tensors when loading (ViT stores
    ``...attention.attention.query`` but builds ``...attention.q_proj``). The mapping is read off
    the loading itself: every on-disk tensor is filled with its own marker value (distinct among
    tensors of one shape) and loaded, and each in-memory tensor names the marker it received.
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
    model = load_model(ingredient, markers)
    mapping = {}
    for name, tensor in model.state_dict().items():
        candidates = groups.get(tuple(tensor.shape))
        if not tensor.is_floating_point() or not candidates or tensor.numel() == 0:
            continue
        value = tensor.flatten()[0].item()
        index = round(value) - 1
        if not (0 <= index < len(candidates)) or not bool((tensor == value).all()):
            raise HfSoupsError(
                f"{ingredient.name}: cannot tell which stored tensor in-memory {name!r} loads"
            )
        mapping[name] = candidates[index]
    return mapping


def per_tensor_method(
    template: Ingredient, tensor_weights: dict[str, list[float]]
) -> PerTensorWeights:
    """The learned-by-layer coefficients (keyed by in-memory names) as a merge method keyed by
    on-disk names, which the streaming engine runs and a recipe replays."""
    names = disk_names(template)
    weights = {names[name]: row for name, row in tensor_weights.items() if name in names}
    missing = [
        name
        for name, info in template.tensors.items()
        if info.dtype.is_floating_point and name not in weights
    ]
    if missing:
        raise HfSoupsError(f"learned soup: no coefficients for stored tensor {missing[0]!r}")
    return PerTensorWeights(weights)
