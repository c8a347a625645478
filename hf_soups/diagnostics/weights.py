"""Pairwise weight statistics of ingredients, streamed one tensor name at a time.

The statistics run through the merge engine (:func:`hf_soups.merged_tensors.merged_tensors`) as a
:class:`~hf_soups.methods.base.MergeMethod`: the engine reads one tensor name from every
ingredient (and the base) with :meth:`Ingredient.read`, so memory holds the N tensors of one name,
never N models. For each tensor the method accumulates, in float64 over slices of at most
:data:`CHUNK_ELEMENTS` elements:

- ``||theta_i||^2`` per ingredient;
- ``||theta_i - theta_j||^2`` per pair, from the differences themselves (a Gram-matrix shortcut
  ``|a|^2 + |b|^2 - 2<a, b>`` cancels catastrophically when fine-tunes are close);
- the Gram matrix ``<u_i, u_j>`` of ``u = theta - base`` when a base is given (cosines of task
  vectors), else of the raw weights.

Every aggregate (whole model, per layer, per tensor) is a sum of these per-tensor sums. Integer
and boolean buffers are not compared (the engine copies them rather than averaging).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hf_soups.ingredients import Ingredient, check_compatible
from hf_soups.merge import IngredientLike, as_ingredients
from hf_soups.merged_tensors import merged_tensors
from hf_soups.methods.base import MergeMethod, TensorLoader

logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_ELEMENTS",
    "TensorStatistics",
    "WeightStatistics",
    "layer_of",
    "pairwise_weight_statistics",
]

CHUNK_ELEMENTS = 1 << 20
"""Elements per float64 slice: bounds the temporaries to N x 8 MiB whatever the tensor size."""

_LAYER_INDEX = re.compile(r"^(.*?\.\d+)\.")


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: the name up to its first numeric component
    (``vit.encoder.layer.3``), else its module (``classifier`` for ``classifier.weight``)."""
    match = _LAYER_INDEX.match(name)
    if match:
        return match.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass
class TensorStatistics:
    """Float64 sums over one tensor, from which every pairwise statistic is derived.

    Attributes:
        numel: number of elements.
        sq_norms: ``||theta_i||^2`` per ingredient, shape ``(N,)``.
        sq_distances: ``||theta_i - theta_j||^2``, shape ``(N, N)``, symmetric, zero diagonal.
        gram: ``<u_i, u_j>`` with ``u = theta - base`` (or ``theta`` without a base), ``(N, N)``.
        base_sq_norm: ``||base||^2``, or ``None`` without a base.
    """

    numel: int
    sq_norms: np.ndarray
    sq_distances: np.ndarray
    gram: np.ndarray
    base_sq_norm: float | None = None


def tensor_statistics(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None
) -> TensorStatistics:
    """The float64 sums of one tensor name across ingredients (see :class:`TensorStatistics`)."""
    n = len(tensors)
    flat = [tensor.reshape(-1) for tensor in tensors]
    base_flat = base.reshape(-1) if base is not None else None
    numel = flat[0].numel()
    sq_norms = torch.zeros(n, dtype=torch.float64)
    sq_distances = torch.zeros(n, n, dtype=torch.float64)
    gram = torch.zeros(n, n, dtype=torch.float64)
    base_sq_norm = torch.zeros((), dtype=torch.float64)
    for start in range(0, numel, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, numel)
        x = torch.stack([f[start:stop].to(torch.float64) for f in flat])
        sq_norms += x.square().sum(dim=1)
        u = x
        if base_flat is not None:
            b = base_flat[start:stop].to(torch.float64)
            base_sq_norm += b.square().sum()
            u = x - b
        gram += u @ u.T
        for i in range(n - 1):
            sq_distances[i, i + 1 :] += (x[i + 1 :] - x[i]).square().sum(dim=1)
    sq_distances = sq_distances + sq_distances.T
    return TensorStatistics(
        numel=numel,
        sq_norms=sq_norms.numpy(),
        sq_distances=sq_distances.numpy(),
        gram=gram.numpy(),
        base_sq_norm=float(base_sq_norm) if base is not None else None,
    )


class _StatisticsCollector(MergeMethod):
    """Collects :class:`TensorStatistics` as the engine streams tensors through it.

    The engine wants a merged tensor back; the uniform average costs one pass more and lets the
    engine's finiteness check name any ingredient holding NaN or infinite weights.
    """

    name = "pairwise_statistics"

    def __init__(self) -> None:
        self.tensors: dict[str, TensorStatistics] = {}

    def merge_tensor(
        self,
        name: str,
        tensors: Sequence[TensorLoader],
        base: TensorLoader | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loaded = [load() for load in tensors]
        self.tensors[name] = tensor_statistics(loaded, base() if base is not None else None)
        mean = loaded[0].clone()
        for tensor in loaded[1:]:
            mean.add_(tensor)
        return mean.div_(len(loaded))

    def parameters(self) -> dict:
        return {}


def _sqrt(values: np.ndarray) -> np.ndarray:
    # Float64 sums of squares are never negative; clip guards the derived soup distances.
    return np.sqrt(np.clip(values, 0.0, None))


def _median_ratio(numerators: list[np.ndarray], denominators: list) -> np.ndarray:
    """Elementwise median over tensors of numerator / denominator, skipping zero denominators."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN, as meant
        ratios = np.stack(
            [np.where(d > 0, n / d, np.nan) for n, d in zip(numerators, denominators)]
        )
        return np.nanmedian(ratios, axis=0)


def _cosines(gram: np.ndarray) -> np.ndarray:
    norms = _sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = gram / np.outer(norms, norms)
    return np.where(np.outer(norms, norms) > 0, np.clip(cosines, -1.0, 1.0), np.nan)


@dataclass
class WeightStatistics:
    """Pairwise statistics of N ingredients' weights, whole-model and per tensor.

    Attributes:
        ingredients: display names, in order; matrices are indexed the same way.
        base: the base's display name, or ``None`` (then cosines are of the raw weights).
        tensors: tensor name -> :class:`TensorStatistics`, for every floating tensor.
        skipped: non-floating tensors (integer buffers), not compared.
    """

    ingredients: list[str]
    base: str | None
    tensors: dict[str, TensorStatistics] = field(repr=False)
    skipped: list[str] = field(default_factory=list, repr=False)

    @property
    def cosine_of(self) -> str:
        """What the cosines compare: ``"deltas from the base"`` or ``"raw weights"``."""
        return "deltas from the base" if self.base is not None else "raw weights"

    def _sum(self, get: Callable[[TensorStatistics], Any], names: Sequence[str] | None = None):
        names = self.tensors if names is None else names
        return sum(np.asarray(get(self.tensors[name]), dtype=np.float64) for name in names)

    @property
    def norms(self) -> np.ndarray:
        """``||theta_i||`` over every floating tensor, shape ``(N,)``."""
        return _sqrt(self._sum(lambda s: s.sq_norms))

    @property
    def distances(self) -> np.ndarray:
        """L2 distances ``||theta_i - theta_j||``, shape ``(N, N)``."""
        return _sqrt(self._sum(lambda s: s.sq_distances))

    @property
    def relative_distances(self) -> np.ndarray:
        """``||theta_i - theta_j|| / ||theta_i||`` (row ``i`` relative to ingredient ``i``):
        about 1.41 for unrelated weights of equal norm, far less for fine-tunes of one start."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.distances / self.norms[:, None]

    @property
    def median_relative_distances(self) -> np.ndarray:
        """Median over tensors of ``||a_t - b_t|| / ||a_t||`` (row ``a``), shape ``(N, N)``.

        Unrelated tensors are about ``sqrt(2)`` = 1.41 apart relative to their norm, tensors of
        fine-tunes of one start a small fraction of it. Unlike the whole-model ratio, the median
        is not pulled down by the LayerNorm scales near 1 that every start shares. Tensors of
        zero norm (a bias still at its zero start) are left out.
        """
        return _median_ratio(
            [_sqrt(s.sq_distances) for s in self.tensors.values()],
            [_sqrt(s.sq_norms)[:, None] for s in self.tensors.values()],
        )

    @property
    def median_relative_moves(self) -> np.ndarray | None:
        """Median over tensors of ``||theta_t - base_t|| / ||base_t||``, shape ``(N,)``, or
        ``None`` without a base (see :attr:`median_relative_distances`)."""
        if self.base is None:
            return None
        return _median_ratio(
            [_sqrt(np.diag(s.gram)) for s in self.tensors.values()],
            [np.sqrt(s.base_sq_norm) for s in self.tensors.values()],
        )

    @property
    def cosines(self) -> np.ndarray:
        """Cosine similarities of :attr:`cosine_of`, shape ``(N, N)`` (NaN for a zero vector,
        such as a delta of an ingredient identical to the base)."""
        return _cosines(self._sum(lambda s: s.gram))

    @property
    def delta_norms(self) -> np.ndarray | None:
        """``||theta_i - base||``, or ``None`` without a base."""
        if self.base is None:
            return None
        return _sqrt(np.diag(self._sum(lambda s: s.gram)))

    @property
    def base_norm(self) -> float | None:
        """``||base||``, or ``None`` without a base."""
        if self.base is None:
            return None
        return float(np.sqrt(self._sum(lambda s: s.base_sq_norm)))

    @property
    def distances_to_soup(self) -> np.ndarray:
        """``||theta_i - mean_j theta_j||``: distance of each ingredient to the uniform soup.

        Derived from the pairwise distances: ``|x_i - m|^2 = mean_j d_ij^2 - mean_jk d_jk^2 / 2``.
        """
        sq = self._sum(lambda s: s.sq_distances)
        return _sqrt(sq.mean(axis=1) - sq.mean() / 2.0)

    def medoid(self) -> int:
        """Index of the ingredient with the smallest total distance to the others: a reference
        that an odd one out (another start) is not, as long as most share one start."""
        return int(np.argmin(self.distances.sum(axis=1)))

    def _pair_rows(
        self, i: int, j: int, groups: dict[str, list[str]]
    ) -> list[dict[str, float | int | str]]:
        rows = []
        for group, names in groups.items():
            sq_norms = self._sum(lambda s: s.sq_norms, names)
            distance = float(_sqrt(self._sum(lambda s: s.sq_distances, names)[i, j]))
            norm_i = float(np.sqrt(sq_norms[i]))
            rows.append(
                {
                    "name": group,
                    "numel": int(sum(self.tensors[name].numel for name in names)),
                    "distance": distance,
                    "relative_distance": distance / norm_i if norm_i > 0 else float("nan"),
                    "cosine": float(_cosines(self._sum(lambda s: s.gram, names))[i, j]),
                }
            )
        return rows

    def per_tensor(self, i: int, j: int) -> list[dict[str, float | int | str]]:
        """One row per tensor for the pair ``(i, j)``: its L2 distance, distance relative to
        ingredient ``i``'s tensor norm, and cosine (of :attr:`cosine_of`)."""
        return self._pair_rows(i, j, {name: [name] for name in self.tensors})

    def per_layer(self, i: int, j: int) -> list[dict[str, float | int | str]]:
        """As :meth:`per_tensor`, with tensors grouped by :func:`layer_of`."""
        groups: dict[str, list[str]] = {}
        for name in self.tensors:
            groups.setdefault(layer_of(name), []).append(name)
        return self._pair_rows(i, j, groups)

    def to_dict(self, *, per_tensor: bool = False) -> dict[str, Any]:
        """JSON-able record: matrices as nested lists (NaN as ``None``), optionally per tensor."""
        record: dict[str, Any] = {
            "ingredients": list(self.ingredients),
            "base": self.base,
            "cosine_of": self.cosine_of,
            "norms": _listed(self.norms),
            "distances": _listed(self.distances),
            "relative_distances": _listed(self.relative_distances),
            "median_relative_distances": _listed(self.median_relative_distances),
            "cosines": _listed(self.cosines),
            "distances_to_soup": _listed(self.distances_to_soup),
            "delta_norms": _listed(self.delta_norms) if self.base is not None else None,
            "median_relative_moves": (
                _listed(self.median_relative_moves) if self.base is not None else None
            ),
            "base_norm": self.base_norm,
            "skipped_tensors": list(self.skipped),
        }
        if per_tensor:
            record["tensors"] = {
                name: {
                    "numel": stats.numel,
                    "distances": _listed(_sqrt(stats.sq_distances)),
                    "cosines": _listed(_cosines(stats.gram)),
                }
                for name, stats in self.tensors.items()
            }
        return record


def _listed(array: np.ndarray) -> list:
    return [_listed(row) for row in array] if array.ndim > 1 else [_finite(v) for v in array]


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def pairwise_weight_statistics(
    ingredients: Sequence[IngredientLike],
    *,
    base: IngredientLike | None = None,
    progress: bool = True,
) -> WeightStatistics:
    """Stream every floating tensor of the ingredients once and collect pairwise statistics.

    Args:
        ingredients: :class:`Ingredient`s, folders or Hub ids (at least one).
        base: the common pre-trained start; cosines are then of the deltas ``theta - base``
            (task vectors). Without it they are of the raw weights, which fine-tunes of one start
            share almost entirely (cosines near 1), so they say little beyond the distances.
        progress: show a progress bar over tensors.

    Returns:
        A :class:`WeightStatistics`.

    Raises:
        IncompatibleIngredientsError: the ingredients (or the base) differ in architecture,
            tensor names or shapes.
        NonFiniteWeightsError: an ingredient holds NaN or infinite weights.
    """
    ingredients = as_ingredients(ingredients)
    base_ingredient: Ingredient | None = as_ingredients([base])[0] if base is not None else None
    check_compatible([*ingredients, *([base_ingredient] if base_ingredient else [])])
    template = ingredients[0]
    # File order keeps each input file's reads sequential, as the merge engine reads.
    names = sorted(
        template.tensors, key=lambda n: (str(template.tensors[n].file), template.tensors[n].offset)
    )
    floating = [name for name in names if template.tensors[name].dtype.is_floating_point]
    collector = _StatisticsCollector()
    stream = merged_tensors(ingredients, collector, floating, base=base_ingredient)
    for _ in tqdm(stream, total=len(floating), desc="Weight statistics", disable=not progress):
        pass
    stats = WeightStatistics(
        ingredients=[ingredient.name for ingredient in ingredients],
        base=base_ingredient.name if base_ingredient is not None else None,
        tensors={name: collector.tensors[name] for name in floating},
        skipped=[name for name in names if name not in collector.tensors],
    )
    logger.info(
        "Compared %d tensors of %d ingredients (cosines of %s)",
        len(stats.tensors),
        len(ingredients),
        stats.cosine_of,
    )
    return stats
