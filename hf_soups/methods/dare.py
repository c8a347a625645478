"""DARE (Yu et al., ICML 2024): drop delta entries at random and rescale the survivors.

Each entry of each task vector ``tau_i = theta_i - theta_0`` is dropped with probability ``p``
and the survivors are multiplied by ``1 / (1 - p)``, which keeps the expected task vector. The
sparsified vectors are then combined by a weighted sum (``dare_linear``, task arithmetic) or by
TIES' sign election and disjoint mean (``dare_ties``).

Randomness is seeded per tensor and per ingredient, from ``seed``, the tensor's name (through
``zlib.crc32``, stable across processes) and the ingredient's position, mixed by numpy's
``SeedSequence``: a merge gives the same result whatever the order in which tensors are visited,
the sharding, or the process. The mask of ingredient ``i`` for tensor ``name`` is
``torch.rand(shape, generator=g) >= p`` with ``g`` a CPU ``torch.Generator`` seeded with
:func:`dare_seed`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from hf_soups.errors import InvalidWeightsError
from hf_soups.methods.base import MergeMethod, TensorLoader
from hf_soups.methods.task_arithmetic import (
    Scaling,
    check_fraction,
    check_scaling,
    require_base,
    warn_if_extrapolating,
)
from hf_soups.methods.ties import TIES_CITATION, check_merged_scaling, elect_and_disjoint_merge

DARE_CITATION = """@inproceedings{yu2024language,
  title={Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
    Lunch},
  author={Yu, Le and Yu, Bowen and Yu, Haiyang and Huang, Fei and Li, Yongbin},
  booktitle={International Conference on Machine Learning},
  year={2024},
  url={https://arxiv.org/abs/2311.03099}
}"""


def dare_seed(seed: int, name: str, index: int) -> int:
    """The seed of the drop mask of ingredient ``index`` for tensor ``name``."""
    entropy = [seed, zlib.crc32(name.encode("utf-8")), index]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def drop_and_rescale(delta: torch.Tensor, drop_rate: float, seed: int) -> torch.Tensor:
    """Zero each entry of ``delta`` with probability ``drop_rate`` and divide the rest by
    ``1 - drop_rate`` (in place), with the mask drawn from a generator seeded with ``seed``."""
    if drop_rate == 0.0:
        return delta
    generator = torch.Generator().manual_seed(seed)
    dropped = torch.rand(delta.shape, generator=generator) < drop_rate
    return delta.masked_fill_(dropped, 0.0).div_(1.0 - drop_rate)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidWeightsError(f"seed: must be a non-negative integer, got {seed!r}")
    return seed


class _DARE(MergeMethod):
    needs_base = True

    def __init__(self, drop_rate: float, seed: int):
        self.drop_rate = check_fraction(drop_rate, "drop_rate", allow_zero=True, allow_one=False)
        self.seed = _check_seed(seed)

    def _sparse_delta(
        self, name: str, tensors: Sequence[TensorLoader], base_tensor: torch.Tensor, index: int
    ) -> torch.Tensor:
        delta = tensors[index]().sub_(base_tensor)
        return drop_and_rescale(delta, self.drop_rate, dare_seed(self.seed, name, index))


class DARELinear(_DARE):
    """DARE then task arithmetic: ``theta_0 + sum_i lambda_i * dare(tau_i)``.

    Args:
        drop_rate: ``p``, the probability of dropping each delta entry, in [0, 1) (the paper
            reaches 0.9 and beyond on large models). ``p = 0`` is plain task arithmetic.
        scaling: ``lambda``, one coefficient for all task vectors or one per ingredient.
        seed: base seed of the drop masks (see the module notes).
    """

    name = "dare_linear"
    citation = DARE_CITATION

    def __init__(self, drop_rate: float = 0.9, scaling: Scaling = 1.0, seed: int = 0):
        super().__init__(drop_rate, seed)
        self.scaling = check_scaling(scaling)
        self._warned: set[int] = set()

    def check(self, num_ingredients: int) -> None:
        # DARE rescales the kept deltas to their expected value: the scalings extrapolate
        # exactly as task arithmetic's do.
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
        total = torch.zeros_like(base_tensor)
        for index, coefficient in enumerate(check_scaling(self.scaling, len(tensors))):
            if coefficient != 0.0:
                delta = self._sparse_delta(name, tensors, base_tensor, index)
                total.add_(delta, alpha=coefficient)
        return total.add_(base_tensor)

    def parameters(self) -> dict:
        return {"drop_rate": self.drop_rate, "scaling": self.scaling, "seed": self.seed}


class DARETIES(_DARE):
    """DARE then TIES' sign election and disjoint mean:
    ``theta_0 + lambda * disjoint_mean(elect(dare(tau_i)))``.

    Args:
        drop_rate: ``p``, the probability of dropping each delta entry, in [0, 1).
        scaling: ``lambda``, the scale of the merged task vector.
        seed: base seed of the drop masks (see the module notes).
    """

    name = "dare_ties"
    citation = DARE_CITATION + "\n\n" + TIES_CITATION

    def __init__(self, drop_rate: float = 0.9, scaling: float = 1.0, seed: int = 0):
        super().__init__(drop_rate, seed)
        self.scaling = check_merged_scaling(self.name, scaling)

    def merge_tensor(
        self,
        name: str,
        tensors: Sequence[TensorLoader],
        base: TensorLoader | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        base_tensor = require_base(self, base)()
        merged = elect_and_disjoint_merge(
            lambda index: self._sparse_delta(name, tensors, base_tensor, index), len(tensors)
        )
        return merged.mul_(self.scaling).add_(base_tensor)

    def parameters(self) -> dict:
        return {
            "drop_rate": self.drop_rate,
            "scaling": self.scaling,
            "seed": self.seed,
            "sign_election": "total",
        }

    @classmethod
    def from_parameters(cls, parameters: dict) -> DARETIES:
        # The sign election is recorded for readers; "total" is the only one implemented.
        parameters = dict(parameters)
        if parameters.pop("sign_election", "total") != "total":
            raise ValueError("sign_election: only 'total' (the paper's) is implemented")
        return cls(**parameters)
