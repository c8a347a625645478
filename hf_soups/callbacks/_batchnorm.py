"""BatchNorm statistics recomputed for averaged weights, in one or several processes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from hf_soups.callbacks._trainer_io import distributed_world_size


def _forward_batch(model: torch.nn.Module, batch: Any, device: torch.device | None) -> None:
    if isinstance(batch, Mapping):
        model(**{k: v.to(device) if torch.is_tensor(v) and device else v for k, v in batch.items()})
    else:
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        model(batch.to(device) if device is not None else batch)


@torch.no_grad()
def update_bn(
    batches: Iterable[Any],
    model: torch.nn.Module,
    *,
    device: torch.device | None = None,
    max_batches: int | None = None,
) -> int:
    """Recompute BatchNorm running statistics with one pass over ``batches``.

    The semantics of :func:`torch.optim.swa_utils.update_bn` (statistics reset, then a
    cumulative average over batches with ``momentum=None``), extended to the dict batches a
    Trainer's dataloader yields (``model(**batch)``). In a multi-process run each rank sees its
    own shard, and the per-rank averages are combined weighted by batch counts, so every rank
    ends with the same statistics.

    Returns:
        The number of batches seen by this process (0 when the model has no BatchNorm).
    """
    momenta = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.reset_running_stats()
            momenta[module] = module.momentum
    if not momenta:
        return 0
    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None
    seen = 0
    try:
        for batch in tqdm(batches, desc="BatchNorm statistics", total=max_batches, leave=False):
            if max_batches is not None and seen >= max_batches:
                break
            _forward_batch(model, batch, device)
            seen += 1
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)
    if distributed_world_size() > 1:
        _combine_bn_statistics(list(momenta), seen)
    return seen


def _combine_bn_statistics(modules: list[torch.nn.Module], seen: int) -> None:
    """Average per-rank cumulative statistics, weighted by each rank's number of batches."""
    device = modules[0].running_mean.device
    total = torch.tensor(float(seen), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    for module in modules:
        for name in ("running_mean", "running_var"):
            statistic = getattr(module, name)
            weighted = statistic.double() * seen
            dist.all_reduce(weighted)
            statistic.copy_(weighted / total.clamp_min(1))
        module.num_batches_tracked.fill_(int(total.item()))


#: Appended to the average's description when only the first eval dataset saw it.
