"""Task arithmetic (Ilharco et al., ICLR 2023): add scaled task vectors to the base model.

A task vector is a fine-tuned model minus its pre-trained base, ``tau_i = theta_i - theta_0``;
``theta = theta_0 + sum_i lambda_i * tau_i`` adds the tasks (``lambda_i > 0``) or forgets them
(negation, ``lambda_i < 0``). The sum is streamed: one fine-tuned tensor in memory at a time.

The scalings extrapolate when they sum to more than 1: with the default ``lambda_i = 1`` and N
task vectors from fine-tunes of one task (a sweep), the result moves N times as far from the
base as one fine-tune along their shared direction, rather than to their average (``1 / N``
each). Adding different tasks is what the paper does, with one ``lambda`` tuned on held-out
data (about 0.3 to 0.5 for several tasks there). A warning names the sum when it is above 1.

The helpers here (:func:`check_scaling`, :func:`check_fraction`, :func:`require_base`) are shared
by the other task-vector methods (TIES, DARE).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from hf_soups.errors import InvalidWeightsError, MissingBaseError
from hf_soups.methods.base import MergeMethod, TensorLoader

logger = logging.getLogger(__name__)

Scaling = float | Sequence[float]


def check_scaling(scaling: Scaling, num_ingredients: int | None = None) -> list[float] | float:
    """Validate ``scaling``: one finite number, or one per ingredient when ``num_ingredients``
    is given. Returns a float for a single value, else the list (expanded to ``num_ingredients``
    when given).

    Raises:
        InvalidWeightsError: naming ``scaling`` and the bad value or count.
    """
    if isinstance(scaling, (int, float)):
        values = [float(scaling)]
    else:
        try:
            values = [float(value) for value in scaling]
        except (TypeError, ValueError):
            raise InvalidWeightsError(
                f"scaling: {scaling!r} is neither a number nor a list of numbers"
            ) from None
        if not values:
            raise InvalidWeightsError("scaling: the list of scaling coefficients is empty")
    bad = [value for value in values if not math.isfinite(value)]
    if bad:
        raise InvalidWeightsError(f"scaling: {bad[0]} is not a finite number")
    if num_ingredients is None:
        return values[0] if isinstance(scaling, (int, float)) else values
    if isinstance(scaling, (int, float)):
        return values * num_ingredients
    if len(values) != num_ingredients:
        raise InvalidWeightsError(
            f"scaling: got {len(values)} coefficients for {num_ingredients} ingredients"
        )
    return values


def check_fraction(value: float, argument: str, *, allow_zero: bool, allow_one: bool) -> float:
    """Validate a fraction such as a density or a drop rate, naming ``argument`` on error."""
    low = "[0" if allow_zero else "(0"
    high = "1]" if allow_one else "1)"
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidWeightsError(f"{argument}: {value!r} is not a number") from None
    inside = (value >= 0 if allow_zero else value > 0) and (value <= 1 if allow_one else value < 1)
    if not (math.isfinite(value) and inside):
        raise InvalidWeightsError(f"{argument}: must be in {low}, {high}, got {value}")
    return value


def warn_if_extrapolating(
    method: str, coefficients: Sequence[float], warned: set[int] | None = None
) -> None:
    """Warn when the task vectors' scalings sum to more than 1 (see the module docstring);
    with ``warned``, once per number of task vectors (a soup and its merge both check one
    method)."""
    if warned is not None:
        if len(coefficients) in warned:
            return
        warned.add(len(coefficients))
    total = math.fsum(coefficients)
    if total > 1.0:
        logger.warning(
            "%s: the scalings of the %d task vectors sum to %g, so the merge extrapolates past "
            "the fine-tunes; for fine-tunes of one task use %g each (their average), or tune "
            "the scaling on held-out data",
            method,
            len(coefficients),
            total,
            1 / len(coefficients),
        )


def require_base(method: MergeMethod, base: TensorLoader | None) -> TensorLoader:
    """The base loader, or :class:`MissingBaseError` when a method that needs one has none."""
    if base is None:
        raise MissingBaseError(f"method {method.name!r} needs a base model (base=...)")
    return base


class TaskArithmetic(MergeMethod):
    """``theta_0 + sum_i lambda_i * (theta_i - theta_0)``.

    Args:
        scaling: ``lambda``, one coefficient for every task vector or one per ingredient.
            Negative values negate a task (forgetting it). The paper picks it on held-out data;
            1.0 adds the task vectors as they are, which extrapolates for several fine-tunes
            of one task (a warning says so when the scalings sum to more than 1).
    """

    name = "task_arithmetic"
    needs_base = True
    citation = """@inproceedings{ilharco2023editing,
  title={Editing Models with Task Arithmetic},
  author={Ilharco, Gabriel and Ribeiro, Marco Tulio and Wortsman, Mitchell and Gururangan,
    Suchin and Schmidt, Ludwig and Hajishirzi, Hannaneh and Farhadi, Ali},
  booktitle={International Conference on Learning Representations},
  year={2023},
  url={https://arxiv.org/abs/2212.04089}
}"""

    def __init__(self, scaling: Scaling = 1.0):
        self.scaling = check_scaling(scaling)
        self._warned: set[int] = set()

    def check(self, num_ingredients: int) -> None:
        coefficients = check_scaling(self.scaling, num_ingredients)
        warn_if_extrapolating(self.name, coefficients, self._warned)

    def merge_tensor(
        self,
        name: str,
        tensors: Sequence[TensorLoader],
        base: TensorLoader | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        base_tensor = require_base(self, base)()
        coefficients = check_scaling(self.scaling, len(tensors))
        # Summing the deltas rather than computing (1 - sum lambda) theta_0 + sum lambda theta_i
        # avoids cancelling large weights in float32 when the task vectors are small.
        total = torch.zeros_like(base_tensor)
        for coefficient, load in zip(coefficients, tensors):
            if coefficient != 0.0:
                total.add_(load().sub_(base_tensor), alpha=coefficient)
        return total.add_(base_tensor)

    def parameters(self) -> dict:
        return {"scaling": self.scaling}
