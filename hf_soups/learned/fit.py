"""Fitting a learned soup's mixing coefficients, streamed tensor by tensor.

The model is the official learned soup of mlfoundations/model-soups (``learned_bylayer.py``): a
``[tensors x models]`` matrix of weights (one row shared by all tensors for the plain learned
soup), a learned logit scale, cross-entropy on held-out data, AdamW at lr 0.05. The official code
stacks every ingredient and differentiates through ``functional_call`` over their combination
(about 490 GB of RAM for 72 ViT-B/32 models). Here nothing is stacked unless asked: the mixed
tensor is ``theta_j = sum_m alpha[j, m] theta_jm``, so

    dL/dalpha[j, m] = <dL/dtheta_j, theta_jm>.

Each step therefore (1) builds the mixed weights in one model, tensor by tensor, from the
ingredients' files; (2) runs forward and backward once, which gives ``dL/dtheta_j`` for every
mixed tensor (one model-sized gradient); (3) reads the ingredients again and takes the dot
products; (4) steps the coefficients (:mod:`~hf_soups.learned.coefficients`). Memory is one
model's weights and gradients plus the tensors in flight, whatever N. Tensors the loss does not
reach through autograd (a CLIP classifier's text tower) are found on one example before the fit:
they are never read, keep the first ingredient's values during the fit, and get no learned
coefficients (a learned-by-layer soup mixes them with the per-model weights, as it mixes the
stored tensors a ``task``'s computed head stands in for).

With ``block_size=K`` (MEHL-Soup's block coordinate descent) a step updates K random ingredients:
the dot products need only their tensors and the mixed weights are updated from them, so a step
reads 2K tensors per name instead of 2N.

Data-parallel: under ``accelerate launch`` every process takes its contiguous share of each
global batch (``split_between_processes``), computes the summed loss's coefficient gradients on
it, and the gradients and example counts are summed across processes
(``accelerate.utils.reduce``) before the step, so N processes fit the coefficients one process
fits on the same global batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import reduce
from tqdm.auto import tqdm

from hf_soups.errors import HfSoupsError
from hf_soups.ingredients import Ingredient
from hf_soups.learned.coefficients import MixingCoefficients, Parameterisation
from hf_soups.learned.mixed import CoefficientGradients, MixedModel
from hf_soups.learned.placement import MEMORY_CHOICES, Memory
from hf_soups.merged_tensors import dtype_name
from hf_soups.models import ZeroShotTask

logger = logging.getLogger(__name__)


@dataclass
class LearnedCoefficients:
    """The fitted mixing coefficients.

    Attributes:
        model_weights: one weight per ingredient (for ``by_layer``, the mean over the tensors
            whose coefficients were learned).
        tensor_weights: per tensor (in-memory parameter names), one weight per ingredient;
            ``None`` for the plain learned soup.
        logit_scale: the learned scale of the logits (does not change predictions).
        losses: mean training loss per epoch.
        options: how they were fitted (parameterisation, block size, seed, placement, ...).
        frozen: in-memory names of the tensors the loss does not reach (no coefficients
            learned).
    """

    model_weights: list[float]
    tensor_weights: dict[str, list[float]] | None
    logit_scale: float
    losses: list[float]
    options: dict[str, Any] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "model_weights": self.model_weights,
            "tensor_weights": self.tensor_weights,
            "logit_scale": self.logit_scale,
            "losses": self.losses,
            "options": self.options,
            "frozen": self.frozen,
        }


def fit_mixing_coefficients(
    ingredients: Sequence[Ingredient],
    dataset,
    *,
    by_layer: bool = False,
    epochs: int = 5,
    lr: float = 0.05,
    batch_size: int = 64,
    input_column: str = "pixel_values",
    label_column: str = "labels",
    seed: int = 0,
    memory: Memory = "auto",
    coefficients: Parameterisation = "simplex",
    block_size: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    task: ZeroShotTask | None = None,
) -> LearnedCoefficients:
    """Fit mixing coefficients on held-out ``dataset`` by minimising cross-entropy.

    Args:
        ingredients: the soup's ingredients (one layout).
        dataset: a ``datasets.Dataset`` (or any dataset indexable by a list of indices that
            returns a dict of batched tensors) with ``input_column`` and ``label_column``.
        by_layer: one coefficient per ingredient and tensor instead of per ingredient.
        epochs, lr, batch_size: passes over ``dataset``, AdamW's learning rate, examples per
            step (the global batch, whatever the number of processes).
        seed: the batch order (``torch.randperm(len(dataset))`` per epoch, from a
            ``torch.Generator`` seeded with ``seed``) and the blocks (``randperm(N)[:K]``, sorted,
            per step, from a generator seeded with ``seed + 1``).
        memory: where the ingredients are kept (:class:`~hf_soups.learned.placement.
            IngredientTensors`): ``"stream"`` from the files, ``"host"`` stacked in host RAM,
            ``"device"`` stacked on the device, ``"auto"`` by
            :func:`~hf_soups.learned.placement.choose_memory`. Same coefficients either way.
        coefficients: ``"simplex"`` (softmax, the official learned soup) or ``"hyperplane"``
            (summing to one, free to extrapolate; MEHL-Soup).
        block_size: update a random block of this many ingredients per step (MEHL-Soup's block
            coordinate descent); ``None`` updates all of them.
        dtype: precision of the mixed weights, gradients and coefficients.
        device: where the model runs (default: the accelerator's, or ``PartialState``'s).
        accelerator: the ``Accelerator`` whose processes share the data (default: the running
            ``PartialState``; one process unless under ``accelerate launch``).
        progress: show a progress bar (on the local main process).
        task: scores CLIP ingredients without a head (see :func:`hf_soups.models.load_model`).
    """
    if memory not in MEMORY_CHOICES:
        raise ValueError(f"memory={memory!r}: expected one of {MEMORY_CHOICES}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    n = len(ingredients)
    if block_size is not None and not 1 <= block_size <= n:
        raise ValueError(f"block_size={block_size}: expected 1 to {n} (the ingredients)")
    block_size = None if block_size == n else block_size
    state = accelerator or PartialState()
    device = torch.device(device) if device is not None else state.device
    if hasattr(dataset, "with_format"):
        dataset = dataset.with_format("torch", columns=[input_column, label_column])
    if len(dataset) == 0:
        raise HfSoupsError("learned soup: the held-out dataset is empty")

    def fetch(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = dataset[indices]
        inputs = batch[input_column].to(device)
        inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
        return inputs, batch[label_column].to(device)

    mixed = MixedModel(
        ingredients,
        by_layer=by_layer,
        memory=memory,
        device=device,
        dtype=dtype,
        probe=fetch([0])[0],
        input_column=input_column,
        task=task,
    )
    coefs = MixingCoefficients(mixed.num_rows, n, coefficients, lr=lr, device=device, dtype=dtype)
    order = torch.Generator().manual_seed(seed)
    blocks = torch.Generator().manual_seed(seed + 1)
    steps = epochs * math.ceil(len(dataset) / batch_size)
    logger.info(
        "learned soup: %d ingredients, %d of %d tensors mixed, memory=%s, %d steps",
        n,
        len(mixed.rows),
        len(mixed.tensors),
        mixed.memory,
        steps,
    )
    losses = []
    mixed.mix(coefs.weights())
    with tqdm(
        total=steps,
        desc="Learning soup coefficients",
        disable=not (progress and state.is_local_main_process),
    ) as bar:
        for _ in range(epochs):
            permutation = torch.randperm(len(dataset), generator=order).tolist()
            loss_total = count_total = 0.0
            for start in range(0, len(permutation), batch_size):
                block = (
                    list(range(n))
                    if block_size is None
                    else sorted(torch.randperm(n, generator=blocks)[:block_size].tolist())
                )
                with state.split_between_processes(permutation[start : start + batch_size]) as mine:
                    local = (
                        mixed.gradients(*fetch(mine), coefs.logit_scale, block)
                        if mine
                        else mixed.no_gradients(len(block), device)
                    )
                # Summed over the processes' examples, then divided by their number: the mean
                # over the global batch, as one process computes it.
                total = CoefficientGradients.unpack(
                    reduce(local.pack(), reduction="sum"), mixed.num_rows, len(block)
                )
                before = coefs.weights()
                coefs.step(
                    total.weights / total.count,
                    total.mixed / total.count,
                    total.logit_scale / total.count,
                    block,
                )
                if block_size is None:
                    mixed.mix(coefs.weights())
                else:
                    mixed.update(before, coefs.weights(), block)
                loss_total += float(total.loss)
                count_total += float(total.count)
                bar.update()
            losses.append(loss_total / count_total)
            logger.info("learned soup: epoch loss %.4f", losses[-1])
    alpha = coefs.weights().cpu().double()
    tensor_weights = None
    if by_layer:
        tensor_weights = {name: alpha[row].tolist() for name, row in mixed.rows.items()}
    return LearnedCoefficients(
        model_weights=alpha.mean(dim=0).tolist(),
        tensor_weights=tensor_weights,
        logit_scale=coefs.logit_scale.item(),
        losses=losses,
        options={
            "coefficients": coefficients,
            "block_size": block_size,
            "seed": seed,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "memory": mixed.memory,
            "dtype": dtype_name(dtype),
        },
        frozen=mixed.frozen,
    )
