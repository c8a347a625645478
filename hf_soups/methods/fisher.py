"""Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022).

Each ingredient's parameters are weighted, entry by entry, by the diagonal of its Fisher
information: ``theta_j = sum_i w_i F_i,j theta_i,j / sum_i w_i F_i,j``. With equal Fishers this is
the plain weighted average.

:func:`compute_fisher` estimates the diagonal Fisher of a classifier once, on given data, and
stores it as a model folder (safetensors keyed as the model's weights on disk, written through the
model's own ``save_pretrained``); :class:`FisherAverage` streams those files beside the weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm

from hf_soups.errors import IncompatibleIngredientsError, InvalidWeightsError
from hf_soups.ingredients import Ingredient
from hf_soups.methods.base import MergeMethod, TensorLoader, check_weights, first_weighted
from hf_soups.output import atomic_output_dir, check_output_dir

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

FisherType = Literal["expected", "sampled", "empirical"]
FISHER_METADATA_FILE = "fisher.json"

CITATION = """@inproceedings{matena2022merging,
  title={Merging Models with Fisher-Weighted Averaging},
  author={Matena, Michael S and Raffel, Colin A},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022},
  url={https://arxiv.org/abs/2111.09832}
}"""


def _fisher_loader(
    dataset: datasets.Dataset,
    num_examples: int | None,
    batch_size: int,
    input_column: str,
    label_column: str | None,
) -> torch.utils.data.DataLoader:
    columns = [input_column] + ([label_column] if label_column else [])
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset has no column {missing[0]!r} (columns: {dataset.column_names}); set "
            "input_column / label_column"
        )
    if num_examples is not None:
        if num_examples < 1 or num_examples > len(dataset):
            raise ValueError(
                f"num_examples: {num_examples} requested but the dataset has {len(dataset)} rows"
            )
        dataset = dataset.select(range(num_examples))
    # A dataset with its own transform (set_transform) is used as it is, as the Evaluator does.
    if dataset.format["type"] is None:
        dataset = dataset.with_format("torch", columns=columns)

    def collate(rows: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            column: torch.stack([torch.as_tensor(row[column]) for row in rows])
            for column in columns
        }

    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate
    )


def _weighted_labels(
    log_probs: torch.Tensor,
    fisher_type: FisherType,
    label: torch.Tensor | None,
    generator: torch.Generator,
) -> list[tuple[int, float]]:
    """The labels whose squared log-likelihood gradients make one example's Fisher, with their
    weights: every class weighted by its probability (expected), one drawn class (sampled), or
    the true one (empirical)."""
    if fisher_type == "expected":
        return [(c, p) for c, p in enumerate(log_probs.exp().tolist()) if p > 0.0]
    if fisher_type == "sampled":
        return [(int(torch.multinomial(log_probs.exp().cpu(), 1, generator=generator)), 1.0)]
    return [(int(label), 1.0)]


def compute_fisher(
    model_source: str | os.PathLike | Ingredient,
    dataset: datasets.Dataset,
    out_dir: str | os.PathLike,
    *,
    num_examples: int | None = None,
    batch_size: int = 32,
    fisher_type: FisherType = "expected",
    input_column: str = "pixel_values",
    label_column: str = "labels",
    seed: int = 0,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Estimate the diagonal Fisher of a classifier and save it as a model folder.

    ``F = mean over examples x of E_y[(d log p(y | x) / d theta)^2]``, with ``y``:

    - ``"expected"`` (default, the paper's): the exact expectation over the model's own output
      distribution, ``sum_c p(c | x) (d log p(c | x) / d theta)^2``; one backward pass per class
      and example, so prefer ``"sampled"`` when there are many classes.
    - ``"sampled"``: one label drawn from ``p(y | x)`` per example (an unbiased estimate of the
      expected Fisher, one backward pass per example; draws seeded by ``seed``).
    - ``"empirical"``: the true label of ``label_column`` (the "empirical Fisher", which is not
      the Fisher of the model's distribution).

    Gradients are per example, as the diagonal Fisher needs their squares; ``batch_size`` only
    sets how many examples are read at once. The model runs in eval mode (no dropout) in float32.

    Args:
        model_source: model folder, Hub id or :class:`Ingredient`, loaded with
            :func:`hf_soups.models.load_model`.
        dataset: a ``datasets.Dataset`` with ``input_column`` (and ``label_column`` for the
            empirical Fisher), as the Evaluator takes.
        out_dir: folder to write (atomically): the Fisher values in the model's own safetensors
            layout and names (written by the model's ``save_pretrained``, parameters replaced by
            their Fisher values; parameters without gradient and floating buffers get 0), its
            config, and ``fisher.json`` recording how they were computed.
        num_examples: use the first ``num_examples`` rows (default: all).
        device: where to run (default: CUDA when available, else CPU).

    Returns:
        ``out_dir``, ready for :class:`FisherAverage`.
    """
    # Imported here: hf_soups.models pulls in every model family, which merging never needs.
    from hf_soups.models import load_model, logits_of, save_model

    if fisher_type not in ("expected", "sampled", "empirical"):
        raise ValueError(
            f"fisher_type: expected 'expected', 'sampled' or 'empirical', got {fisher_type!r}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    check_output_dir(out_dir, overwrite)  # before the work, not after it
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loader = _fisher_loader(
        dataset,
        num_examples,
        batch_size,
        input_column,
        label_column if fisher_type == "empirical" else None,
    )
    model = load_model(model_source, trust_remote_code=trust_remote_code).float().to(device).eval()
    parameters = [p for p in model.parameters() if p.requires_grad]
    squares = [torch.zeros_like(p) for p in parameters]
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with tqdm(
        total=len(loader.dataset), desc="Fisher", unit="example", disable=not progress
    ) as bar:
        for batch in loader:
            inputs = batch[input_column].to(device)
            for row in range(len(inputs)):
                output = model(**{input_column: inputs[row : row + 1]})
                log_probs = logits_of(output)[0].float().log_softmax(-1)
                label = batch[label_column][row] if fisher_type == "empirical" else None
                classes = _weighted_labels(log_probs.detach(), fisher_type, label, generator)
                for position, (target, weight) in enumerate(classes):
                    grads = torch.autograd.grad(
                        log_probs[target],
                        parameters,
                        retain_graph=position < len(classes) - 1,
                        allow_unused=True,
                    )
                    for square, grad in zip(squares, grads):
                        if grad is not None:
                            square.addcmul_(grad, grad, value=weight)
                count += 1
                bar.update()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.zero_()
        for parameter, square in zip(parameters, squares):
            parameter.copy_(square.div_(count))
    metadata = {
        "model": str(getattr(model_source, "source", model_source)),
        "fisher_type": fisher_type,
        "num_examples": count,
        "seed": seed if fisher_type == "sampled" else None,
    }
    with atomic_output_dir(out_dir, overwrite=overwrite) as work_dir:
        save_model(model.cpu(), work_dir, overwrite=True)
        (work_dir / FISHER_METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    logger.info(
        "Saved the %s Fisher of %s (%d examples) to %s",
        fisher_type,
        metadata["model"],
        count,
        out_dir,
    )
    return Path(out_dir)


class FisherAverage(MergeMethod):
    """Fisher-weighted averaging: ``sum_i w_i F_i theta_i / sum_i w_i F_i``, entry by entry.

    Args:
        fisher_dirs: one Fisher folder per ingredient, in the ingredients' order (from
            :func:`compute_fisher`, or any folder of safetensors holding a non-negative tensor
            of the same name and shape for every merged tensor).
        epsilon: floor on the Fisher values, ``F <- max(F, epsilon)``, as the official code's
            ``fisher_floor``: it keeps the denominator positive and falls back to the plain
            weighted average where no model has information.
        weights: the merging coefficients ``w_i`` (default uniform), non-negative, not all zero.

    The Fisher tensors are read one at a time beside the weights, so memory stays at a few
    tensors whatever the number of ingredients.
    """

    name = "fisher"
    needs_base = False
    citation = CITATION

    def __init__(
        self,
        fisher_dirs: Sequence[str | os.PathLike | Ingredient],
        epsilon: float = 1e-6,
        weights: Sequence[float] | None = None,
    ):
        if isinstance(fisher_dirs, (str, os.PathLike)) or not fisher_dirs:
            raise InvalidWeightsError(
                "fisher_dirs: give a list of Fisher folders, one per ingredient"
            )
        self.fishers = [
            f if isinstance(f, Ingredient) else Ingredient.from_folder(f) for f in fisher_dirs
        ]
        try:
            epsilon = float(epsilon)
        except (TypeError, ValueError):
            raise InvalidWeightsError(f"epsilon: {epsilon!r} is not a number") from None
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise InvalidWeightsError(f"epsilon: must be a positive number, got {epsilon}")
        self.epsilon = epsilon
        self.weights = None if weights is None else [float(w) for w in weights]

    def check(self, num_ingredients: int) -> None:
        if len(self.fishers) != num_ingredients:
            raise InvalidWeightsError(
                f"fisher_dirs: got {len(self.fishers)} Fisher folders for {num_ingredients} "
                "ingredients"
            )
        if self.weights is not None:
            weights = check_weights(self.weights, num_ingredients)
            if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
                raise InvalidWeightsError(
                    f"weights: Fisher averaging needs non-negative weights, not all zero; got "
                    f"{weights}"
                )

    def buffer_source(self, num_ingredients: int) -> int:
        return first_weighted(self.weights or [1.0])

    def _fisher(self, index: int, name: str, shape: torch.Size) -> torch.Tensor:
        fisher = self.fishers[index]
        info = fisher.tensors.get(name)
        if info is None:
            raise IncompatibleIngredientsError(
                f"{fisher.path}: no Fisher values for tensor {name!r}"
            )
        if tuple(info.shape) != tuple(shape):
            raise IncompatibleIngredientsError(
                f"{fisher.path}: Fisher of tensor {name!r} has shape {list(info.shape)}, the "
                f"weights have {list(shape)}"
            )
        return fisher.read(name).to(torch.float32).clamp_(min=self.epsilon)

    def merge_tensor(
        self,
        name: str,
        tensors: Sequence[TensorLoader],
        base: TensorLoader | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check(len(tensors))
        weights = self.weights or [1.0] * len(tensors)
        numerator = denominator = None
        for index, (weight, load) in enumerate(zip(weights, tensors)):
            if weight == 0.0:
                continue
            theta = load()
            fisher = self._fisher(index, name, theta.shape)
            if weight != 1.0:
                fisher.mul_(weight)
            if numerator is None:
                numerator, denominator = theta.mul_(fisher), fisher
            else:
                numerator.addcmul_(fisher, theta)
                denominator.add_(fisher)
        return numerator.div_(denominator)

    def parameters(self) -> dict:
        return {
            "fishers": [
                {"path": str(fisher.path), **fisher_metadata(fisher.path)}
                for fisher in self.fishers
            ],
            "epsilon": self.epsilon,
            "weights": self.weights,
        }

    @classmethod
    def from_parameters(cls, parameters: dict) -> FisherAverage:
        parameters = dict(parameters)
        fisher_dirs = [fisher["path"] for fisher in parameters.pop("fishers")]
        return cls(fisher_dirs, **parameters)


def fisher_metadata(folder: str | os.PathLike) -> dict:
    """What :func:`compute_fisher` recorded about a Fisher folder (``{}`` if nothing)."""
    file = Path(folder) / FISHER_METADATA_FILE
    return json.loads(file.read_text()) if file.is_file() else {}
