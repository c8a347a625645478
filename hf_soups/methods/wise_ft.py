"""WiSE-FT interpolation (Wortsman et al., CVPR 2022) as a merge method.

``theta(alpha) = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned`` over exactly two
ingredients, ``[zero_shot, fine_tuned]``. It differs from the plain weighted average in two
exactness guarantees:

- ``alpha = 0`` and ``alpha = 1`` give the two endpoints bit for bit;
- a tensor that is identical in both endpoints is kept bit for bit. ``0.7 * x + 0.3 * x`` is not
  always ``x`` in floating point, and PAINT relies on frozen parameters (the text tower, hence the
  zero-shot heads built from it) being exactly those of the zero-shot model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from hf_soups import citations
from hf_soups.errors import InvalidWeightsError
from hf_soups.methods.base import MergeMethod, TensorLoader, first_weighted

logger = logging.getLogger(__name__)

__all__ = ["WISE_FT_CITATION", "Interpolation", "check_alpha", "interpolate"]

WISE_FT_CITATION = citations.WISE_FT


def check_alpha(alpha: float, *, warn: bool = True) -> float:
    """Return ``alpha`` as a float; refuse non-finite values, warn outside ``[0, 1]``."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise InvalidWeightsError(f"alpha: {alpha!r} is not a number") from None
    if not math.isfinite(alpha):
        raise InvalidWeightsError(f"alpha: {alpha} is not a finite number")
    if warn and not 0.0 <= alpha <= 1.0:
        logger.warning("alpha=%g lies outside [0, 1]: extrapolating, not interpolating", alpha)
    return alpha


def interpolate(zero_shot: torch.Tensor, fine_tuned: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * zero_shot + alpha * fine_tuned`` in float32, exact at the endpoints and
    where both tensors are equal. The inputs are not modified."""
    zero_shot, fine_tuned = zero_shot.float(), fine_tuned.float()
    if alpha == 0.0 or torch.equal(zero_shot, fine_tuned):
        return zero_shot.clone()
    if alpha == 1.0:
        return fine_tuned.clone()
    return zero_shot.mul(1.0 - alpha).add_(fine_tuned.mul(alpha))


class Interpolation(MergeMethod):
    """WiSE-FT interpolation of two ingredients, ``[zero_shot, fine_tuned]``, as a merge method.

    Recorded in ``soup.json`` as method ``"wise_ft"`` with parameters ``{"alpha": alpha}``.
    """

    name = "wise_ft"
    by_name = False
    citation = WISE_FT_CITATION

    def __init__(self, alpha: float):
        # Checked here, warned about once per merge (in check): a recipe builds the method too.
        self.alpha = check_alpha(alpha, warn=False)

    def check(self, num_ingredients: int) -> None:
        check_alpha(self.alpha)
        if num_ingredients != 2:
            raise InvalidWeightsError(
                f"WiSE-FT interpolates exactly two models (zero-shot, fine-tuned); got "
                f"{num_ingredients}"
            )

    def buffer_source(self, num_ingredients: int) -> int:
        return first_weighted([1.0 - self.alpha, self.alpha])

    def merge_tensor(
        self,
        name: str,
        tensors: Sequence[TensorLoader],
        base: TensorLoader | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        zero_shot, fine_tuned = tensors
        return interpolate(zero_shot(), fine_tuned(), self.alpha)

    def parameters(self) -> dict:
        return {"alpha": self.alpha}
