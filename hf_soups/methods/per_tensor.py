"""A weighted average with its own mixing weights for every tensor.

The learned soup "by layer" (the official ``learned_bylayer.py`` of mlfoundations/model-soups)
fits one coefficient per model and per tensor; this method replays those coefficients through the
streaming engine, ``theta_j = sum_m w_jm * theta_jm`` for each tensor ``j``, keyed by the names
the tensors have on disk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_soups import citations
from hf_soups.errors import InvalidWeightsError
from hf_soups.methods.base import (
    MergeMethod,
    TensorLoader,
    WeightedAverage,
    check_weights,
    first_weighted,
)

__all__ = ["PerTensorWeights"]


class PerTensorWeights(MergeMethod):
    """``theta_j = sum_m weights[j][m] * theta_jm``; tensors without weights of their own take
    ``default`` (when given)."""

    name = "per_tensor_weights"
    by_name = False
    citation = citations.SOUPS

    def __init__(
        self, weights: Mapping[str, Sequence[float]], default: Sequence[float] | None = None
    ):
        self.weights = {name: [float(w) for w in row] for name, row in weights.items()}
        self.default = None if default is None else [float(w) for w in default]
        self._average = WeightedAverage([])

    def check(self, num_ingredients: int) -> None:
        if not self.weights:
            raise InvalidWeightsError("per-tensor weights: no tensor has weights")
        if self.default is not None:
            self.default = check_weights(self.default, num_ingredients)
        for name, row in self.weights.items():
            try:
                self.weights[name] = check_weights(row, num_ingredients)
            except InvalidWeightsError as error:
                raise InvalidWeightsError(f"tensor {name!r}: {error}") from None

    def buffer_source(self, num_ingredients: int) -> int:
        rows = list(self.weights.values())
        return first_weighted([any(row[i] for row in rows) for i in range(num_ingredients)])

    def merge_tensor(
        self,
        name: str,
        tensors: Sequence[TensorLoader],
        base: TensorLoader | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        weights = self.weights.get(name, self.default)
        if weights is None:
            raise InvalidWeightsError(f"per-tensor weights: none given for tensor {name!r}")
        # One WeightedAverage serves every tensor, so its read buffer is reused throughout.
        self._average.weights = weights
        return self._average.merge_tensor(name, tensors, base, out)

    def parameters(self) -> dict:
        return {"weights": self.weights, "default": self.default}
