"""The interface every merge rule implements, and the weighted average all soups use.

A merge method is a small function from the ingredients' tensors of one name (and the base's)
to one output tensor; the streaming engine in :mod:`hf_soups.merge` runs it tensor by tensor.
Tensors arrive as loaders (callables) so a weighted sum holds one input tensor at a time, while a
method that needs all of them at once (TIES, Model Stock, ...) simply calls every loader.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from hf_soups.errors import InvalidWeightsError, MissingBaseError

logger = logging.getLogger(__name__)

TensorLoader = Callable[..., torch.Tensor]
"""``load(out=None)``: the tensor in float32, read into ``out`` (same shape) when given."""


class ReusedBuffer:
    """Float32 memory for one tensor at a time, as large as the largest asked for so far.

    ``buffer(shape)`` returns a view of it; the next call reuses the same memory. Reading into
    memory already touched costs no new pages, which is most of a fresh read's time (0.30 s
    against 0.05 s for a 605 MB checkpoint in the page cache, benchmarks/README.md).
    """

    def __init__(self) -> None:
        self._memory: torch.Tensor | None = None

    def __call__(self, shape: torch.Size) -> torch.Tensor:
        numel = shape.numel()
        if self._memory is None or self._memory.numel() < numel:
            self._memory = None  # the old memory goes before the new is allocated
            self._memory = torch.empty(numel, dtype=torch.float32)
        return self._memory[:numel].view(shape)


class MergeMethod(ABC):
    """A rule combining the ingredients' float32 tensors of one name into one tensor."""

    name: str
    needs_base: bool = False
    citation: str | None = None
    by_name: bool = True
    """Offered by name with its parameters (``hf-soups merge --method``, YAML recipes); False
    for rules that other entry points build (soups' weights, WiSE-FT, learned coefficients)."""

    @abstractmethod
    def merge_tensor(
        self,
        name: str,
        tensors: Sequence[TensorLoader],
        base: TensorLoader | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the merged float32 tensor ``name`` from loaders of the ingredients' tensors.

        ``out``, when given, is float32 memory of the tensor's shape that the result may be
        computed into (the streaming merge passes buffers it reuses, so that no tensor costs new
        pages); a method is free to ignore it and return a new tensor.
        """

    @abstractmethod
    def parameters(self) -> dict:
        """The method's parameters, recorded in the recipe and the model card."""

    @classmethod
    def from_parameters(cls, parameters: dict) -> MergeMethod:
        """Rebuild the method from what :meth:`parameters` recorded (how a recipe replays)."""
        return cls(**parameters)

    def check(self, num_ingredients: int) -> None:  # noqa: B027 - optional hook
        """Validate the method's parameters against the number of ingredients."""

    def buffer_source(self, num_ingredients: int) -> int:
        """Index of the ingredient whose integer and boolean buffers (position ids and the like,
        copied rather than merged) the output takes: the first one, unless a method weighs it
        out."""
        return 0


def check_weights(weights: Sequence[float], num_ingredients: int) -> list[float]:
    """Validate mixing weights: one finite number per ingredient, not summing to zero (which
    would scale every merged tensor to nothing, or to the difference of ingredients)."""
    weights = [float(weight) for weight in weights]
    if len(weights) != num_ingredients:
        raise InvalidWeightsError(
            f"weights: got {len(weights)} weights for {num_ingredients} ingredients"
        )
    bad = [weight for weight in weights if not math.isfinite(weight)]
    if bad:
        raise InvalidWeightsError(f"weights: {bad[0]} is not a finite number")
    # Zero up to rounding: 0.1 + 0.2 - 0.3 is 2.8e-17, not 0.
    if abs(math.fsum(weights)) <= 1e-9 * max(map(abs, weights), default=0.0):
        raise InvalidWeightsError(f"weights: {weights} sum to zero")
    return weights


def first_weighted(weights: Sequence[float]) -> int:
    """Index of the first non-zero weight (0 when none is): the ingredient whose integer
    buffers a merge copies, since one weighted out contributes nothing to the merge."""
    return next((index for index, weight in enumerate(weights) if weight != 0.0), 0)


# Weights from a softmax or 1/N sum to one only up to rounding.
_SUM_TOLERANCE = 1e-5


class WeightedAverage(MergeMethod):
    """``sum_i w_i * theta_i``: uniform soups (``w_i = 1/N``), weighted soups and WiSE-FT
    interpolation (``(1 - alpha, alpha)``) are all this one rule.

    The sum is accumulated in float32 with one input tensor in memory at a time.
    """

    name = "weighted_average"
    by_name = False

    def __init__(self, weights: Sequence[float]):
        self.weights = [float(weight) for weight in weights]
        # Every read after the first goes into this one buffer.
        self._scratch = ReusedBuffer()

    def check(self, num_ingredients: int) -> None:
        """Validate the weights (:func:`check_weights`), and warn once when some are negative
        or they do not sum to one: legitimate (extrapolation, task arithmetic) but also what a
        typo looks like."""
        self.weights = check_weights(self.weights, num_ingredients)
        total = math.fsum(self.weights)
        unusual = []
        negative = [f"{weight:g}" for weight in self.weights if weight < 0]
        if negative:
            unusual.append(f"negative weight(s) {', '.join(negative)} extrapolate")
        if abs(total - 1.0) > _SUM_TOLERANCE:
            unusual.append(
                f"they sum to {total:g}, not 1, which scales every merged tensor (rescale them "
                "to sum to one: hf-soups merge --normalize)"
            )
        if unusual:
            logger.warning("weights %s: %s", self.weights, "; ".join(unusual))

    def buffer_source(self, num_ingredients: int) -> int:
        return first_weighted(self.weights)

    def merge_tensor(
        self,
        name: str,
        tensors: Sequence[TensorLoader],
        base: TensorLoader | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        terms = [(weight, load) for weight, load in zip(self.weights, tensors) if weight != 0.0]
        if not terms:
            return torch.zeros_like(tensors[0]())
        (first_weight, first), rest = terms[0], terms[1:]
        total = first(out) if out is not None else first()
        if first_weight != 1.0:
            total.mul_(first_weight)
        for weight, load in rest:
            total.add_(load(self._scratch(total.shape)), alpha=weight)
        return total

    def parameters(self) -> dict:
        return {"weights": self.weights}


def check_method_inputs(method: MergeMethod, num_ingredients: int, has_base: bool) -> None:
    """The one check of a method against its inputs: its parameters fit the number of
    ingredients, and a base model is given exactly when the method works from one.

    Raises:
        MissingBaseError: the method needs a base model and none is given.
        ValueError: a base model is given to a method that has no use for it.
    """
    if method.needs_base and not has_base:
        raise MissingBaseError(f"method {method.name!r} needs a base model (base=...)")
    if has_base and not method.needs_base:
        raise ValueError(f"method {method.name!r} does not use a base model; drop base=")
    method.check(num_ingredients)
