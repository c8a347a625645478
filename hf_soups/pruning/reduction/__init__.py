"""Structured reduction of ViT and CLIP MLP widths.

Example::

    from hf_soups.pruning.reduction import reduce_and_retrain, save_reduced, trainer_retrain

    result = reduce_and_retrain(
        model, batches, retrain=trainer_retrain(args, train_dataset),
        target_parameters=0.3, target_flops=0.3, step_flops=0.1,
    )
    save_reduced(result, "reduced")  # plain from_pretrained folder + reduction.json

Neurons are scored by first-order Taylor importance (or weight magnitude without data), cut
where the least importance is lost per FLOP saved, the same number from every layer of a tower
so the config just has a smaller ``intermediate_size``.
"""

from hf_soups.pruning.reduction.importance import (
    IMPORTANCE_METHODS,
    magnitude_importance,
    neuron_importance,
    taylor_importance,
)
from hf_soups.pruning.reduction.loop import (
    REDUCTION_FILE,
    ReductionResult,
    reduce_and_retrain,
    save_reduced,
    trainer_retrain,
)
from hf_soups.pruning.reduction.step import ReductionStep, flops_per_neuron, plan_cuts, reduce_mlp
from hf_soups.pruning.reduction.towers import MLPTower, mlp_towers, narrowed_model

__all__ = [
    "IMPORTANCE_METHODS",
    "MLPTower",
    "REDUCTION_FILE",
    "ReductionResult",
    "ReductionStep",
    "flops_per_neuron",
    "magnitude_importance",
    "mlp_towers",
    "narrowed_model",
    "neuron_importance",
    "plan_cuts",
    "reduce_and_retrain",
    "reduce_mlp",
    "save_reduced",
    "taylor_importance",
    "trainer_retrain",
]
