"""Unstructured pruning: masks from magnitude, SNIP, GraSP, SynFlow and stacked scoring.

Example::

    from hf_soups.pruning import SNIP, Magnitude, Stacked, prune, save_pruned

    masks = prune(model, Stacked([SNIP([batch]), Magnitude()]), sparsity=0.8)
    save_pruned(model, masks, "pruned")  # weights + pruning_mask.safetensors

Masks map in-memory parameter names to bool tensors (``True`` kept); pruned weights are exact
zeros. The prunable tensors are the weight matrices of Linear and Conv layers
(:func:`prunable_parameters`).

Structured reduction of ViT/CLIP MLP widths lives in :mod:`hf_soups.pruning.reduction`
(:func:`reduce_mlp`, :func:`reduce_and_retrain`, :func:`save_reduced`); parameter and FLOP
counts from a config in :mod:`hf_soups.pruning.flops` (:func:`model_counts`).
"""

from hf_soups.pruning.grasp import GraSP
from hf_soups.pruning.magnitude import Magnitude
from hf_soups.pruning.mask_file import (
    MASK_FILE,
    load_masks,
    read_mask_file,
    save_pruned,
    saved_names,
    write_mask_file,
)
from hf_soups.pruning.masks import (
    apply_masks,
    apply_masks_to_model,
    density_of,
    masks_from_scores,
    sparsity_by_tensor,
)
from hf_soups.pruning.scorer import OneShotScorer, Scorer, model_loss, prune
from hf_soups.pruning.snip import SNIP
from hf_soups.pruning.soup_mask import MASK_RULES, SoupMask, soup_mask
from hf_soups.pruning.stacked import Stacked, stage_densities
from hf_soups.pruning.synflow import SynFlow
from hf_soups.pruning.targets import prunable_parameters

__all__ = [
    "MASK_FILE",
    "MASK_RULES",
    "SNIP",
    "SoupMask",
    "SparseSoupResult",
    "SparseSoupRound",
    "GraSP",
    "Magnitude",
    "OneShotScorer",
    "Scorer",
    "Stacked",
    "SynFlow",
    "apply_masks",
    "apply_masks_to_model",
    "density_of",
    "saved_names",
    "load_masks",
    "masks_from_scores",
    "model_loss",
    "model_counts",
    "prunable_parameters",
    "prune",
    "reduce_and_retrain",
    "reduce_mlp",
    "read_mask_file",
    "save_pruned",
    "save_reduced",
    "soup_mask",
    "sparse_soup_rounds",
    "sparsity_by_tensor",
    "stage_densities",
    "write_mask_file",
]


def __getattr__(name: str):
    # The Sparse Model Soups loop, the reduction and the counts need transformers;
    # hf_soups.ingredients imports this package (for MASK_FILE) and must not pull transformers
    # into a plain safetensors merge.
    if name in ("SparseSoupResult", "SparseSoupRound", "sparse_soup_rounds"):
        from hf_soups.pruning import rounds

        return getattr(rounds, name)
    if name == "model_counts":
        from hf_soups.pruning import flops

        return flops.model_counts
    if name in ("reduce_mlp", "reduce_and_retrain", "save_reduced"):
        from hf_soups.pruning import reduction

        return getattr(reduction, name)
    raise AttributeError(f"module 'hf_soups.pruning' has no attribute {name!r}")
