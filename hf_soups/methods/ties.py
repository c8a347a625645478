"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

For each tensor, with task vectors ``tau_i = theta_i - theta_0``:

1. **Trim**: keep the ``max(1, int(density * numel))`` largest magnitudes of each ``tau_i``,
   zero the rest. Entries whose magnitude ties with the smallest kept one are kept too, as the
   paper's threshold (``|tau| >= k-th largest``) does. ``int`` rounds down, as peft and mergekit
   do, but at least the largest entry is kept: with ``int`` alone a tensor with
   ``density * numel < 1`` (the bias of a head of 4 classes at density 0.2) is trimmed to
   nothing and silently stays at the base (peft does that; mergekit refuses such a tensor). The
   paper trims over the whole model, where a small tensor keeps its entries that are among the
   largest; keeping each tensor's largest entry is the per-tensor rule nearest to it.
2. **Elect**: the sign of each parameter is the sign of the summed trimmed vectors (the paper's
   "total mass" rule). A zero sum elects ``+``, as peft and mergekit do (the paper's code gives
   such entries the tensor's majority sign instead); entries where every trimmed value is zero
   get no contribution either way.
3. **Disjoint merge**: average, per parameter, only the trimmed values whose sign agrees with the
   elected one (zeros never count); ``theta = theta_0 + lambda * tau_merged``.

Trimming is per tensor, as in peft and mergekit (the paper trims over the whole flattened model),
which is what lets it stream. The elect and merge steps read each task vector twice, so memory
stays at a few tensors whatever the number of ingredients, at the cost of reading every
fine-tuned tensor twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hf_soups.errors import InvalidWeightsError
from hf_soups.methods.base import MergeMethod, TensorLoader
from hf_soups.methods.task_arithmetic import check_fraction, check_scaling, require_base

TIES_CITATION = """@inproceedings{yadav2023ties,
  title={{TIES}-Merging: Resolving Interference When Merging Models},
  author={Yadav, Prateek and Tam, Derek and Choshen, Leshem and Raffel, Colin and Bansal, Mohit},
  booktitle={Advances in Neural Information Processing Systems},
  year={2023},
  url={https://arxiv.org/abs/2306.01708}
}"""


def check_merged_scaling(method: str, scaling: float) -> float:
    """Validate the ``lambda`` of TIES-style methods: one number, since it scales the single
    merged task vector."""
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise InvalidWeightsError(
            f"scaling: method {method!r} scales the merged task vector and takes one number, "
            f"got {scaling!r}"
        )
    return check_scaling(scaling)


def trim_threshold(delta: torch.Tensor, density: float) -> float:
    """The magnitude below which TIES trims ``delta``: its ``max(1, int(density * numel))``-th
    largest ``|delta|`` (0 when nothing is trimmed)."""
    if density >= 1.0 or delta.numel() == 0:
        return 0.0
    keep = max(1, int(density * delta.numel()))
    return delta.abs().view(-1).kthvalue(delta.numel() - keep + 1).values.item()


def magnitude_trim(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the entries of ``delta`` whose magnitude is below ``threshold`` (in place)."""
    return delta.masked_fill_(delta.abs() < threshold, 0.0)


def elect_and_disjoint_merge(
    sparse_delta: Callable[[int], torch.Tensor], num_ingredients: int
) -> torch.Tensor:
    """TIES steps 2 and 3 over the (already sparsified) task vectors ``sparse_delta(i)``.

    ``sparse_delta`` is called twice per ingredient, once per pass, and must return the same
    tensor both times: the first pass sums them to elect signs, the second averages the entries
    that agree with the elected sign.
    """
    mass = sparse_delta(0)
    for index in range(1, num_ingredients):
        mass.add_(sparse_delta(index))
    elected_positive = mass >= 0  # a zero sum elects +
    del mass
    total = None
    agreeing = None
    for index in range(num_ingredients):
        delta = sparse_delta(index)
        agrees = torch.where(elected_positive, delta > 0, delta < 0)
        delta.masked_fill_(~agrees, 0.0)
        if total is None:
            total, agreeing = delta, agrees.to(torch.int32)
        else:
            total.add_(delta)
            agreeing.add_(agrees)
    return total.div_(agreeing.clamp_(min=1))


class TIES(MergeMethod):
    """TIES-Merging: ``theta_0 + lambda * disjoint_mean(elect(trim(tau_i)))``.

    Args:
        density: fraction of each task vector's entries kept by the trim step, in (0, 1]
            (the paper's ``k``, 20% by default there); at least one entry per tensor is kept.
        scaling: ``lambda``, the scale of the merged task vector (1 adds it as it is; the paper
            tunes it on validation data).
    """

    name = "ties"
    needs_base = True
    citation = TIES_CITATION

    def __init__(self, density: float = 0.2, scaling: float = 1.0):
        self.density = check_fraction(density, "density", allow_zero=False, allow_one=True)
        self.scaling = check_merged_scaling(self.name, scaling)

    def merge_tensor(
        self,
        name: str,
        tensors: Sequence[TensorLoader],
        base: TensorLoader | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        base_tensor = require_base(self, base)()
        # Each task vector is read twice; its threshold is found once.
        thresholds: dict[int, float] = {}

        def trimmed(index: int) -> torch.Tensor:
            delta = tensors[index]().sub_(base_tensor)
            if index not in thresholds:
                thresholds[index] = trim_threshold(delta, self.density)
            return magnitude_trim(delta, thresholds[index])

        merged = elect_and_disjoint_merge(trimmed, len(tensors))
        return merged.mul_(self.scaling).add_(base_tensor)

    def parameters(self) -> dict:
        return {"density": self.density, "scaling": self.scaling, "sign_election": "total"}

    @classmethod
    def from_parameters(cls, parameters: dict) -> TIES:
        # The sign election is recorded for readers; "total" is the only one implemented.
        parameters = dict(parameters)
        if parameters.pop("sign_election", "total") != "total":
            raise ValueError("sign_election: only 'total' (the paper's) is implemented")
        return cls(**parameters)
