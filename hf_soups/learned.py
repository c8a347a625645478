"""Learned soups: mixing coefficients fitted by gradient descent on held-out data.

As in the official ``learned_bylayer.py`` of mlfoundations/model-soups: a [tensors x models]
matrix of logits (one row shared by all tensors for the plain learned soup), softmaxed over
models, plus a learned logit scale, trained with AdamW (lr 0.05) for a few epochs on the held-out
split. The model is run with ``torch.func.functional_call`` over the weighted combination, so
gradients reach the coefficients.

Memory: every ingredient is held in memory at once, stacked in float32 (N times one model). The
official run of 72 ViT-B/32 models needed about 490 GB of RAM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from tqdm.auto import tqdm

from hf_soups.errors import HfSoupsError
from hf_soups.ingredients import Ingredient
from hf_soups.methods.per_tensor import PerTensorWeights
from hf_soups.models import load_model, logits_of

logger = logging.getLogger(__name__)


@dataclass
class LearnedCoefficients:
    """The fitted mixing coefficients.

    Attributes:
        model_weights: one weight per ingredient (for ``by_layer``, the mean over tensors).
        tensor_weights: per tensor (in-memory parameter names), one weight per ingredient;
            ``None`` for the plain learned soup.
        logit_scale: the learned scale of the logits (does not change predictions).
        losses: mean training loss per epoch.
    """

    model_weights: list[float]
    tensor_weights: dict[str, list[float]] | None
    logit_scale: float
    losses: list[float]

    def to_dict(self) -> dict:
        return {
            "model_weights": self.model_weights,
            "tensor_weights": self.tensor_weights,
            "logit_scale": self.logit_scale,
            "losses": self.losses,
        }


def stack_ingredients(
    ingredients: Sequence[Ingredient],
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Load every ingredient and stack its floating tensors, keyed by in-memory names.

    Returns the first ingredient's model (the template the combination runs in) and
    ``name -> [N, *shape]`` float32 tensors.
    """
    template = load_model(ingredients[0])
    stacked: dict[str, list[torch.Tensor]] = {
        name: [tensor.detach().float()]
        for name, tensor in template.state_dict().items()
        if tensor.is_floating_point()
    }
    for ingredient in ingredients[1:]:
        state = load_model(ingredient).state_dict()
        for name, tensors in stacked.items():
            tensors.append(state[name].detach().float())
    return template, {name: torch.stack(tensors) for name, tensors in stacked.items()}


def combine(stacked: dict[str, torch.Tensor], alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sum_m alpha[j, m] * theta_m`` for each tensor j (row 0 for all when alpha has one row)."""
    by_layer = alpha.shape[0] > 1
    return {
        name: torch.tensordot(alpha[j if by_layer else 0], tensors, dims=1)
        for j, (name, tensors) in enumerate(stacked.items())
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
    device: str | torch.device | None = None,
    progress: bool = True,
) -> LearnedCoefficients:
    """Fit mixing coefficients on held-out ``dataset`` (a ``datasets.Dataset`` or a torch
    dataset of dicts with ``input_column`` and ``label_column``) by minimising cross-entropy."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    template, stacked = stack_ingredients(ingredients)
    template.to(device).eval()
    for parameter in template.parameters():
        parameter.requires_grad_(False)
    stacked = {name: tensors.to(device) for name, tensors in stacked.items()}
    n = len(ingredients)
    # zeros softmax to the uniform soup, as the official code's all-ones initialisation does.
    alpha_raw = nn.Parameter(torch.zeros(len(stacked) if by_layer else 1, n, device=device))
    logit_scale = nn.Parameter(torch.ones((), device=device))
    optimizer = torch.optim.AdamW([alpha_raw, logit_scale], lr=lr, weight_decay=0.0)
    if hasattr(dataset, "with_format"):
        dataset = dataset.with_format("torch", columns=[input_column, label_column])
    generator = torch.Generator().manual_seed(seed)
    # Whole batches are fetched with one indexing call: row-by-row access to a datasets.Dataset
    # costs more than the tiny forward passes it feeds.
    batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=False)
    loader = DataLoader(dataset, sampler=batches, batch_size=None)
    losses = []
    for _ in tqdm(range(epochs), desc="Learning soup coefficients", disable=not progress):
        total, count = 0.0, 0
        for batch in loader:
            inputs = batch[input_column].to(device)
            labels = batch[label_column].to(device)
            params = combine(stacked, torch.softmax(alpha_raw, dim=1))
            logits = logits_of(functional_call(template, params, kwargs={input_column: inputs}))
            loss = nn.functional.cross_entropy(logit_scale * logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            count += len(labels)
        losses.append(total / count)
        logger.info("learned soup: epoch loss %.4f", losses[-1])
    alpha = torch.softmax(alpha_raw.detach(), dim=1).cpu()
    tensor_weights = (
        {name: alpha[j].tolist() for j, name in enumerate(stacked)} if by_layer else None
    )
    return LearnedCoefficients(
        model_weights=alpha.mean(dim=0).tolist(),
        tensor_weights=tensor_weights,
        logit_scale=logit_scale.item(),
        losses=losses,
    )


def disk_names(ingredient: Ingredient) -> dict[str, str]:
    """In-memory parameter name -> on-disk tensor name, for the ingredient's floating tensors.

    transformers renames some checkpoints' tensors when loading (ViT stores
    ``...attention.attention.query`` but builds ``...attention.q_proj``). The mapping is read off
    the loading itself: every on-disk tensor is filled with its own marker value (distinct among
    tensors of one shape) and loaded, and each in-memory tensor names the marker it received.
    """
    groups: dict[tuple[int, ...], list[str]] = {}
    markers = {}
    for name, info in ingredient.tensors.items():
        if info.dtype.is_floating_point:
            group = groups.setdefault(info.shape, [])
            group.append(name)
            markers[name] = torch.full(info.shape, float(len(group)), dtype=torch.float32)
        else:
            markers[name] = ingredient.read(name)
    model = load_model(ingredient, markers)
    mapping = {}
    for name, tensor in model.state_dict().items():
        candidates = groups.get(tuple(tensor.shape))
        if not tensor.is_floating_point() or not candidates or tensor.numel() == 0:
            continue
        value = tensor.flatten()[0].item()
        index = round(value) - 1
        if not (0 <= index < len(candidates)) or not bool((tensor == value).all()):
            raise HfSoupsError(
                f"{ingredient.name}: cannot tell which stored tensor in-memory {name!r} loads"
            )
        mapping[name] = candidates[index]
    return mapping


def per_tensor_method(
    template: Ingredient, tensor_weights: dict[str, list[float]]
) -> PerTensorWeights:
    """The learned-by-layer coefficients (keyed by in-memory names) as a merge method keyed by
    on-disk names, which the streaming engine runs and a recipe replays."""
    names = disk_names(template)
    weights = {names[name]: row for name, row in tensor_weights.items() if name in names}
    missing = [
        name
        for name, info in template.tensors.items()
        if info.dtype.is_floating_point and name not in weights
    ]
    if missing:
        raise HfSoupsError(f"learned soup: no coefficients for stored tensor {missing[0]!r}")
    return PerTensorWeights(weights)
