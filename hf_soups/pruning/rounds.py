"""The Sparse Model Soups loop (Zimmer, Spiegel & Pokutta, "Sparse model soups: a recipe for
improved pruning via model averaging", ICLR 2024).

Each round prunes the current model by magnitude to the round's sparsity, retrains several
copies of it with one shared mask (differing by seed or hyperparameters) with the ``Trainer``,
and averages them (uniform or greedy soup); the copies share the mask, so the soup keeps the
sparsity, and the soup starts the next round. With one copy this is iterative magnitude pruning
with retraining from the pruned weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PrinterCallback, Trainer, TrainingArguments

from hf_soups.pruning.magnitude import Magnitude
from hf_soups.pruning.masks import density_of
from hf_soups.pruning.scorer import prune

logger = logging.getLogger(__name__)

SOUP_RULES = ("uniform", "greedy")


@dataclass
class SparseSoupRound:
    """What one round did: its sparsity, the copies' held-out scores (greedy soups only), the
    copies kept in the soup and the soup's score."""

    index: int
    sparsity: float
    kept: list[int]
    copy_scores: list[float] = field(default_factory=list)
    soup_score: float | None = None


@dataclass
class SparseSoupResult:
    """The final soup (``model``, pruned in place), its masks and the record of every round."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    rounds: list[SparseSoupRound]


def _average(models: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    states = [m.state_dict() for m in models]
    return {
        name: sum(state[name].float() for state in states).div_(len(states)).to(tensor.dtype)
        if tensor.is_floating_point()
        else tensor
        for name, tensor in states[0].items()
    }


def _greedy(models, score) -> tuple[list[int], list[float], float]:
    """The greedy soup of model soups: copies by decreasing score, each kept only if the soup's
    score strictly improves."""
    scores = [score(m) for m in models]
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    kept, best = [order[0]], scores[order[0]]
    for index in order[1:]:
        candidate = copy.deepcopy(models[0])
        candidate.load_state_dict(_average([models[i] for i in [*kept, index]]))
        value = score(candidate)
        if value > best:
            kept, best = [*kept, index], value
    return kept, scores, best


def sparse_soup_rounds(
    model: nn.Module,
    train_dataset: Any,
    args: TrainingArguments,
    *,
    sparsities: Sequence[float],
    copies: int | Sequence[Mapping[str, Any]] = 3,
    soup: str = "uniform",
    score: Callable[[nn.Module], float] | None = None,
    scope: str = "global",
    include_heads: bool = False,
    masks: Mapping[str, torch.Tensor] | None = None,
    on_round: Callable[[SparseSoupRound, nn.Module], None] | None = None,
    on_copy: Callable[[int, int, nn.Module, Mapping[str, torch.Tensor]], None] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> SparseSoupResult:
    """Run the Sparse Model Soups loop on ``model`` (changed in place: it ends as the last soup).

    Args:
        model: the (pre)trained model to prune.
        train_dataset: what each copy trains on.
        args: the ``TrainingArguments`` of one copy's retraining; each copy writes under
            ``output_dir/round-<r>/copy-<c>``.
        sparsities: the sparsity each round prunes to (increasing, e.g. ``[0.5, 0.8, 0.9]``).
        copies: the number of copies per round (copy ``c`` trains with seed ``args.seed + c``),
            or one mapping of ``TrainingArguments`` overrides per copy (``{"learning_rate":
            ...}``).
        soup: ``"uniform"`` or ``"greedy"`` (needs ``score``, a held-out score to maximise).
        score: ``model -> float`` on held-out data; also records each round's soup score.
        scope: magnitude pruning ``"global"`` or per ``"layer"``.
        masks: masks the model already has (they stay pruned).
        on_round: called with each round's record and the soup (to evaluate it, save it...).
        on_copy: called with the round's index, the copy's number, the retrained copy and the
            round's masks, before the round's soup (to save the copies a soup is made of).
        trainer_kwargs: more ``Trainer`` arguments (``data_collator``, ``processing_class``...).
    """
    # The callback module imports this package: imported here, when both are loaded.
    from hf_soups.callbacks.pruning import IterativeMagnitudePruningCallback

    if soup not in SOUP_RULES:
        raise ValueError(f"soup must be one of {SOUP_RULES}, got {soup!r}")
    if soup == "greedy" and score is None:
        raise ValueError("soup='greedy' needs score, a held-out score to maximise")
    if list(sparsities) != sorted(sparsities):
        raise ValueError(f"sparsities must not decrease, got {list(sparsities)}")
    overrides = (
        [{"seed": args.seed + c} for c in range(copies)] if isinstance(copies, int) else copies
    )
    if not overrides:
        raise ValueError("copies: at least one copy per round")
    rounds = []
    current = dict(masks) if masks is not None else None
    for index, sparsity in enumerate(sparsities):
        current = prune(
            model, Magnitude(), sparsity, scope=scope, include_heads=include_heads, masks=current
        )
        trained = []
        for number, override in enumerate(overrides):
            member = copy.deepcopy(model)
            output_dir = Path(args.output_dir) / f"round-{index}" / f"copy-{number}"
            member_args = dataclasses.replace(args, output_dir=str(output_dir), **override)
            keep_mask = IterativeMagnitudePruningCallback(
                round_steps=1,
                prune_fraction=0.0,
                scope=scope,
                masks=current,
                include_heads=include_heads,
            )
            trainer = Trainer(
                model=member,
                args=member_args,
                train_dataset=train_dataset,
                callbacks=[keep_mask],
                **(trainer_kwargs or {}),
            )
            # One log line per round (below); the Trainer would print a dict per copy.
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            trained.append(member.eval())
            if on_copy is not None:
                on_copy(index, number, member, current)
        if soup == "greedy":
            kept, copy_scores, soup_score = _greedy(trained, score)
        else:
            kept, copy_scores = list(range(len(trained))), []
        model.load_state_dict(_average([trained[i] for i in kept]))
        model.eval()
        record = SparseSoupRound(index, 1.0 - density_of(current), kept, copy_scores)
        if score is not None:
            record.soup_score = soup_score if soup == "greedy" else score(model)
        rounds.append(record)
        logger.info(
            "sparse soup round %d: sparsity %.3f, %d of %d copies kept",
            index,
            record.sparsity,
            len(kept),
            len(trained),
        )
        if on_round is not None:
            on_round(record, model)
    return SparseSoupResult(model=model, masks=current or {}, rounds=rounds)
