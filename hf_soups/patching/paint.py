"""PAINT (Ilharco et al., "Patching open-vocabulary models by interpolating weights", NeurIPS
2022) and WiSE-FT coefficient selection: sweep ``alpha``, choose it on held-out data, save the
chosen model with the whole curve.

PAINT as in the official code (mlfoundations/patching): the zero-shot heads are frozen (one per
task, built from class names and templates), only the image encoder is fine-tuned on the
patching task, zero-shot and fine-tuned weights are interpolated, and every task is scored with
its own head swapped in. Give each supported task's classes as a :class:`TaskSpec`; the patched
model classifies them zero-shot with the heads its (unchanged) text tower builds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_soups import citations
from hf_soups.cards import write_card
from hf_soups.distributed import check_agreement, main_process_only
from hf_soups.evaluation import EvalResult
from hf_soups.ingredients import Ingredient
from hf_soups.merge import IngredientLike
from hf_soups.output import atomic_output_dir, final_path
from hf_soups.patching.interpolation import (
    Endpoints,
    interpolation_recipe,
    source_record,
    wise_ft,
)
from hf_soups.patching.plots import PLOT_FILE, plot_sweep
from hf_soups.patching.selection import AlphaChoice, choose_alpha
from hf_soups.patching.sweep import EvalSet, SweepResult, check_alphas, sweep
from hf_soups.recipe.schema import PatchRecord, Recipe, score_table

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ALPHAS", "PAINT_CITATION", "PatchResult", "choose_wise_ft", "patch"]

DEFAULT_ALPHAS = tuple(round(0.1 * i, 10) for i in range(11))
"""0, 0.1, ..., 1: the grid of the PAINT and WiSE-FT papers."""

PAINT_CITATION = citations.PAINT


@dataclass
class PatchResult:
    """A sweep, the coefficient chosen from it, and how to write the chosen model.

    Attributes:
        zero_shot, fine_tuned: the two endpoints.
        sweep: every score at every ``alpha``.
        choice: the chosen ``alpha`` and the rule's view of each coefficient.
        kind: ``"paint"`` or ``"wise_ft"`` (names the groups in plots and records).
        target_label, preserve_label: names of the two groups of eval sets.
    """

    zero_shot: Ingredient
    fine_tuned: Ingredient
    sweep: SweepResult
    choice: AlphaChoice
    kind: str = "paint"
    target_label: str = "patching task"
    preserve_label: str = "supported tasks"

    @property
    def alpha(self) -> float:
        """The chosen mixing coefficient."""
        return self.choice.alpha

    @property
    def scores(self) -> dict[str, float]:
        """Every eval set's score at the chosen ``alpha``."""
        i = self.choice.index
        return {name: scores[i] for name, scores in self.sweep.scores.items()}

    def model_scores(self) -> dict[str, dict[str, dict]]:
        """Model name -> eval set -> result summary, as ``Soup`` records its scores: the chosen
        model, and the zero-shot and fine-tuned endpoints when they were swept."""
        # The chosen model's row is named as its recipe names it (Recipe.name).
        chosen = f"{'PAINT' if self.kind == 'paint' else 'WiSE-FT'} alpha={self.alpha:g}"
        rows = {chosen: self.alpha, "zero-shot": 0.0, "fine-tuned": 1.0}
        table = {}
        for model_name, alpha in rows.items():
            if alpha not in self.sweep.alphas:
                continue
            i = self.sweep.alphas.index(alpha)
            table[model_name] = {
                name: _summary(results[i]) for name, results in self.sweep.results.items()
            }
        return table

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record: the chosen alpha, the rule, its scores and the whole curve."""
        return {
            "kind": self.kind,
            "chosen_alpha": self.alpha,
            "selection": {
                **self.choice.to_dict(),
                "target_label": self.target_label,
                "preserve_label": self.preserve_label,
            },
            "chosen_scores": self.scores,
            "scores": self.model_scores(),
            "sweep": self.sweep.to_dict(),
        }

    def plot(self, path: str | os.PathLike) -> Path:
        """Draw the sweep with the chosen ``alpha`` marked (see :func:`plot_sweep`)."""
        return plot_sweep(
            self.sweep,
            path,
            target=self.choice.target,
            preserve=self.choice.preserve,
            chosen_alpha=self.alpha,
            target_label=self.target_label,
            preserve_label=self.preserve_label,
            title=f"{'PAINT' if self.kind == 'paint' else 'WiSE-FT'}: "
            f"{_short(self.sweep.zero_shot)} -> {_short(self.sweep.fine_tuned)}",
        )

    def to_model(self) -> nn.Module:
        """The interpolated model at the chosen ``alpha``, in memory."""
        return wise_ft(self.zero_shot, self.fine_tuned, self.alpha)

    @main_process_only
    def save_pretrained(
        self, out_dir: str | os.PathLike, *, overwrite: bool = False, **merge_kwargs
    ) -> Path:
        """Write the chosen model folder with its recipe and plot, atomically.

        The folder holds the interpolated weights (streamed through
        :func:`hf_soups.merge.merge`), ``soup.json`` with method ``"wise_ft"``, the chosen
        ``alpha``, the selection rule, the scores and the whole sweep, and the plot
        ``wise_ft_sweep.png`` (listed under ``"plots"`` for the model card). Under
        ``accelerate launch`` the main process writes it; the others wait and return the path.

        Args:
            out_dir: the folder to create.
            overwrite: replace an existing non-empty folder once the new one is complete.
            **merge_kwargs: ``dtype``, ``max_shard_size``, ``progress``, ... of ``merge``.
        """
        dtype = merge_kwargs.get("dtype")
        with atomic_output_dir(
            out_dir, overwrite=overwrite, inputs=[self.zero_shot.path, self.fine_tuned.path]
        ) as work_dir:
            wise_ft(
                self.zero_shot,
                self.fine_tuned,
                self.alpha,
                out_dir=work_dir,
                recipe=self.recipe(dtype),
                **merge_kwargs,
            )
            self.plot(work_dir / PLOT_FILE)
            write_card(work_dir)  # again, now that the plot it links exists
        logger.info("Wrote the model at alpha=%g to %s", self.alpha, final_path(out_dir))
        return Path(out_dir)

    def recipe(self, dtype: torch.dtype | None = None) -> Recipe:
        """The :class:`~hf_soups.recipe.Recipe` of the chosen model: the interpolation, the two
        ends, the rule, the whole sweep and the scores."""
        record = self.to_dict()
        patch = PatchRecord(
            kind=self.kind,
            zero_shot=source_record(self.zero_shot),
            fine_tuned=source_record(self.fine_tuned),
            chosen_alpha=self.alpha,
            selection=record["selection"],
            sweep=record["sweep"],
            chosen_scores=record["chosen_scores"],
            citation=PAINT_CITATION if self.kind == "paint" else None,
        )
        return interpolation_recipe(
            [self.zero_shot, self.fine_tuned],
            self.alpha,
            dtype,
            patch=patch,
            scores=score_table(record["scores"]),
            plots=[PLOT_FILE],
        )


def _short(source: str) -> str:
    # Local folders are named by their last component; Hub ids ("org/name@rev") stay whole.
    path = Path(source)
    return path.name if path.is_absolute() or path.exists() else source


def _summary(result: EvalResult | float) -> dict:
    return result.to_dict() if isinstance(result, EvalResult) else {"score": float(result)}


def _merge_groups(
    groups: Sequence[tuple[str, Mapping[str, EvalSet]]],
) -> dict[str, EvalSet]:
    merged: dict[str, EvalSet] = {}
    seen: dict[str, str] = {}
    for group, eval_sets in groups:
        for name, eval_set in eval_sets.items():
            if name in merged:
                raise ValueError(f"eval set {name!r} is named in both {seen[name]} and {group}")
            merged[name] = eval_set
            seen[name] = group
    return merged


def _sweep_and_choose(
    zero_shot: IngredientLike,
    fine_tuned: IngredientLike,
    *,
    target: Mapping[str, EvalSet],
    preserve: Mapping[str, EvalSet],
    group_names: tuple[str, str],
    alphas: Sequence[float],
    max_drop: float | None,
    device: str | torch.device | None,
    progress: bool,
    **result_kwargs,
) -> PatchResult:
    if not target:
        raise ValueError(f"{group_names[0]}: give at least one eval set")
    eval_sets = _merge_groups([(group_names[0], target), (group_names[1], preserve)])
    alphas = check_alphas(alphas)
    if max_drop is not None and 0.0 not in alphas:
        logger.info("adding alpha=0: the max-drop rule compares with the zero-shot model")
        alphas = [0.0, *alphas]
    endpoints = Endpoints(zero_shot, fine_tuned)
    result = sweep(endpoints, None, alphas, eval_sets, device=device, progress=progress)
    choice = choose_alpha(
        result.alphas,
        result.scores,
        target=list(target),
        preserve=list(preserve),
        max_drop=max_drop,
    )
    check_agreement(choice.alpha, f"the {result_kwargs['kind']} alpha chosen")
    logger.info("%s", choice.describe())
    return PatchResult(
        zero_shot=endpoints.zero_shot,
        fine_tuned=endpoints.fine_tuned,
        sweep=result,
        choice=choice,
        **result_kwargs,
    )


def patch(
    zero_shot: IngredientLike,
    fine_tuned: IngredientLike,
    *,
    supported: Mapping[str, EvalSet],
    patching: Mapping[str, EvalSet],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    max_supported_drop: float | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PatchResult:
    """Patch a zero-shot model: sweep the interpolation and choose ``alpha`` as PAINT does.

    Args:
        zero_shot: the unpatched model (folder, Hub id or Ingredient).
        fine_tuned: the model fine-tuned on the patching task(s); for PAINT proper, with the
            zero-shot head and text tower frozen (``freeze_text_tower()``, head not trained).
        supported: held-out eval sets of the tasks the zero-shot model already does well, name
            -> :class:`TaskSpec` (with the task's classes, so its own head is swapped in),
            Evaluator or callable.
        patching: held-out eval sets of the patching task(s).
        alphas: coefficients to sweep (default 0, 0.1, ..., 1).
        max_supported_drop: when ``None``, maximise the mean of the patching-task and
            supported-task accuracy (the paper's choice). Otherwise, the best patching accuracy
            among the coefficients that lose at most this much on each supported task relative
            to the zero-shot model (``0.01`` = one point of accuracy; ``alpha = 0`` is added to
            the sweep when missing).
        device: where to score each model (Evaluators use their accelerator's device anyway).
        progress: show progress bars.

    Returns:
        A :class:`PatchResult`; ``.alpha`` is the choice, ``.save_pretrained(dir)`` writes it.
    """
    return _sweep_and_choose(
        zero_shot,
        fine_tuned,
        target=patching,
        preserve=supported,
        group_names=("patching", "supported"),
        alphas=alphas,
        max_drop=max_supported_drop,
        device=device,
        progress=progress,
        kind="paint",
        target_label="patching task",
        preserve_label="supported tasks",
    )


def choose_wise_ft(
    zero_shot: IngredientLike,
    fine_tuned: IngredientLike,
    *,
    in_distribution: Mapping[str, EvalSet],
    shifted: Mapping[str, EvalSet] | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    max_shifted_drop: float | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PatchResult:
    """WiSE-FT with the coefficient chosen on held-out data.

    The same selection as :func:`patch`, with the fine-tuning distribution as the target and the
    distribution shifts as what to preserve: by default the coefficient maximising the mean of
    the in-distribution score and the mean shifted score (only the in-distribution score when
    no shifted set is given). The shifted sets used to choose must be held-out data, not the
    shifts you report (the WiSE-FT paper reports alpha=0.5 or a choice on ID validation data).
    """
    return _sweep_and_choose(
        zero_shot,
        fine_tuned,
        target=in_distribution,
        preserve=shifted or {},
        group_names=("in_distribution", "shifted"),
        alphas=alphas,
        max_drop=max_shifted_drop,
        device=device,
        progress=progress,
        kind="wise_ft",
        target_label="ID",
        preserve_label="shifted",
    )
