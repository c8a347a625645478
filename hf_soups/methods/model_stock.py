"""Model Stock (Jang et al., ECCV 2024): a closed-form interpolation ratio per layer.

For each tensor, with ``k >= 2`` fine-tuned models and their deltas from the pre-trained anchor
``tau_i = theta_i - theta_0``:

    cos  = mean over pairs i < j of cos(tau_i, tau_j)
    t    = k * cos / (1 + (k - 1) * cos)
    out  = t * mean_i(theta_i) + (1 - t) * theta_0

as in the official code (per state-dict entry, so every weight and bias gets its own ratio) and
mergekit (mean of the pairwise cosines when ``k > 2``; the official code, written for ``k = 2``,
has a single angle).

The pairwise mean is streamed: with unit vectors ``u_i = tau_i / |tau_i|``,
``sum_{i<j} <u_i, u_j> = (|sum_i u_i|^2 - sum_i |u_i|^2) / 2``, so each fine-tuned tensor is read
once and memory does not grow with ``k``.

Degenerate cases: a zero delta (a tensor a fine-tune left unchanged) has cosine 0 with every
other delta, as in the official code, where ``1e-8`` in the denominator does this; when every
delta is zero, ``t = 0`` and the output is the base. The official ``1e-8`` also damps the cosine
of deltas whose norms multiply to less than about ``1e-6``; here such deltas count fully, which
changes the output by at most their own size. The paper's geometry assumes ``cos > 0``; a
negative mean cosine gives ``t < 0`` (extrapolation away from the fine-tunes) and is logged, and
when the unit deltas cancel exactly (``1 + (k - 1) cos = 0``, where ``t`` is unbounded) the tensor
is kept from the base.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from hf_soups.errors import InvalidWeightsError
from hf_soups.methods.base import MergeMethod, TensorLoader
from hf_soups.methods.task_arithmetic import require_base

logger = logging.getLogger(__name__)

# Below this, 1 + (k - 1) cos is rounding noise around 0 and t would be meaningless.
_DEGENERATE_DENOMINATOR = 1e-6


class ModelStock(MergeMethod):
    """Model Stock: interpolate, tensor by tensor, between the base and the fine-tunes' mean with
    the ratio given by the angle between their deltas; no held-out data, no search.

    After a merge, :attr:`ratios` maps each merged tensor's name to its ``t``.
    """

    name = "model_stock"
    needs_base = True
    citation = """@inproceedings{jang2024model,
  title={Model Stock: All we need is just a few fine-tuned models},
  author={Jang, Dong-Hwan and Yun, Sangdoo and Han, Dongyoon},
  booktitle={European Conference on Computer Vision},
  year={2024},
  url={https://arxiv.org/abs/2403.19522}
}"""

    def __init__(self) -> None:
        self.ratios: dict[str, float] = {}

    def check(self, num_ingredients: int) -> None:
        if num_ingredients < 2:
            raise InvalidWeightsError(
                f"ingredients: Model Stock needs at least 2 fine-tuned models besides the base, "
                f"got {num_ingredients}"
            )

    def merge_tensor(
        self,
        name: str,
        tensors: Sequence[TensorLoader],
        base: TensorLoader | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        base_tensor = require_base(self, base)()
        k = len(tensors)
        self.check(k)
        delta_sum = torch.zeros_like(base_tensor)
        unit_sum = torch.zeros_like(base_tensor)
        nonzero = 0
        for load in tensors:
            delta = load().sub_(base_tensor)
            norm = torch.linalg.vector_norm(delta, dtype=torch.float64).item()
            delta_sum.add_(delta)
            if norm > 0.0:
                unit_sum.add_(delta, alpha=1.0 / norm)
                nonzero += 1
        unit_norm_sq = torch.linalg.vector_norm(unit_sum, dtype=torch.float64).item() ** 2
        cos = (unit_norm_sq - nonzero) / (k * (k - 1))
        cos = min(max(cos, -1.0), 1.0)
        denominator = 1.0 + (k - 1) * cos
        if denominator <= _DEGENERATE_DENOMINATOR:
            logger.warning(
                "Model Stock: the deltas of tensor %r cancel out (mean cosine %.3g); keeping the "
                "base's values",
                name,
                cos,
            )
            ratio = 0.0
        else:
            ratio = k * cos / denominator
            if cos < 0:
                logger.warning(
                    "Model Stock: tensor %r has a negative mean cosine %.3g between deltas, so "
                    "t = %.3g extrapolates away from the fine-tuned models",
                    name,
                    cos,
                    ratio,
                )
        self.ratios[name] = ratio
        # t * mean(theta_i) + (1 - t) * theta_0 == theta_0 + t * mean(tau_i)
        return delta_sum.mul_(ratio / k).add_(base_tensor)

    def parameters(self) -> dict:
        return {}
