"""Masks from scores, and applying them: ``True`` keeps a weight, ``False`` prunes it.

A mask dictionary maps in-memory parameter names to boolean tensors of the parameter's shape.
Pruned weights are set to exact zeros.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

SCOPES = ("global", "layer")


def _check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")


def kept_count(total: int, density: float) -> int:
    """How many of ``total`` weights a mask at ``density`` keeps (rounded to nearest)."""
    return int(math.floor(total * density + 0.5))


def masks_from_scores(
    scores: Mapping[str, torch.Tensor],
    density: float,
    *,
    scope: str = "global",
    keep_largest: bool = True,
    current: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep the best-scored weights: ``kept_count(n, density)`` of them, ``n`` counted over all
    tensors (``scope="global"``, one threshold) or per tensor (``scope="layer"``).

    Weights already pruned in ``current`` stay pruned and are never counted as kept: ``density``
    is the share of *all* weights kept, so it must not exceed the current density. Ties are
    broken by position (``torch.topk`` on a stable sort), so the count is exact.
    """
    _check_density(density)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    sign = 1.0 if keep_largest else -1.0
    ranked = {}
    for name, score in scores.items():
        value = sign * score.detach().to(torch.float64)
        if current is not None:
            value = value.masked_fill(~current[name].to(value.device), -math.inf)
        ranked[name] = value
    if scope == "layer":
        return {
            name: _keep_top(value, kept_count(value.numel(), density))
            for name, value in ranked.items()
        }
    names = list(ranked)
    flat = torch.cat([ranked[name].flatten().cpu() for name in names])
    kept = _keep_top(flat, kept_count(flat.numel(), density))
    masks, start = {}, 0
    for name in names:
        size = ranked[name].numel()
        masks[name] = kept[start : start + size].view_as(ranked[name]).to(ranked[name].device)
        start += size
    return masks


def _keep_top(values: torch.Tensor, k: int) -> torch.Tensor:
    available = int((values > -math.inf).sum())
    if k > available:
        raise ValueError(f"cannot keep {k} weights: only {available} are still unpruned")
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if k > 0:
        order = torch.sort(values.flatten(), descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask.view_as(values)


@torch.no_grad()
def apply_masks(parameters: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned entries of each named parameter, in place (exact zeros)."""
    for name, mask in masks.items():
        parameters[name].mul_(mask.to(device=parameters[name].device, dtype=parameters[name].dtype))


def apply_masks_to_model(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned entries of ``model``'s parameters named in ``masks``."""
    apply_masks(dict(model.named_parameters()), masks)


def density_of(masks: Mapping[str, torch.Tensor]) -> float:
    """Share of weights kept over all masked tensors."""
    total = sum(mask.numel() for mask in masks.values())
    return sum(int(mask.sum()) for mask in masks.values()) / total if total else 1.0


def sparsity_by_tensor(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Share of weights pruned, per tensor."""
    return {name: 1.0 - int(mask.sum()) / mask.numel() for name, mask in masks.items()}
