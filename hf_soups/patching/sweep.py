"""Score the interpolation between a zero-shot and a fine-tuned model at many coefficients.

Both endpoints are read once (:class:`~hf_soups.patching.interpolation.Endpoints`); each
``alpha``'s model is formed in memory and loaded with :func:`hf_soups.models.load_model`, then
scored on every eval set. An eval set is an :class:`~hf_soups.evaluation.Evaluator`, a callable
``model -> EvalResult | float``, or a :class:`TaskSpec` that also names the task's classes and
prompt templates: the model is then scored with that task's zero-shot head, built from the
model's own text tower and swapped in, as PAINT scores every task (mlfoundations/patching,
``src/eval.py``: one frozen zero-shot head per eval dataset on the shared image encoder).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_soups.evaluation import EvalResult, Evaluator, as_scorer
from hf_soups.merge import IngredientLike
from hf_soups.models import UnsupportedArchitectureError, ZeroShotTask, load_model
from hf_soups.models.zero_shot import Template
from hf_soups.patching.interpolation import Endpoints, check_alpha

logger = logging.getLogger(__name__)

__all__ = ["EvalSet", "SweepResult", "TaskSpec", "sweep"]

# Tensors on the image side of the CLIP classifiers in hf_soups.models (transformers
# CLIPZeroShotClassifier: clip.vision_model / clip.visual_projection; open_clip: visual.*) and
# their head. When fine-tuning changed nothing else, the text tower is the zero-shot one at every
# alpha, so a task's head is built once per sweep instead of once per alpha.
_IMAGE_SIDE_PREFIXES = ("clip.vision_model.", "clip.visual_projection.", "visual.", "classifier.")


@dataclass
class TaskSpec:
    """One eval set of a sweep, optionally with its own zero-shot head (PAINT).

    Attributes:
        evaluator: an :class:`~hf_soups.evaluation.Evaluator`, or a callable
            ``model -> EvalResult | float`` (higher is better).
        classnames: the task's class names, in label order. When given, the model is scored
            with the zero-shot head of these classes and ``templates``, built by the model's
            ``build_head`` from its own text tower and swapped in with ``set_head`` (CLIP
            classifiers of :mod:`hf_soups.models`). When ``None``, the model's own head is used
            (the fine-tuning task, and shifted versions of it).
        templates: prompt templates (``"a photo of a {}."`` or callables).
        tokenizer: the text tokenizer ``build_head`` needs (a transformers tokenizer, or an
            open_clip tokenizer).
        task: a :class:`~hf_soups.models.ZeroShotTask` instead of the three above: the model
            is loaded with it (:func:`hf_soups.models.load_model`), so any CLIP layout works,
            ``CLIPModel`` and ``CLIPVisionModel`` folders included.
    """

    evaluator: Evaluator | Callable[[nn.Module], EvalResult | float]
    classnames: Sequence[str] | None = None
    templates: Sequence[Template] | None = None
    tokenizer: Any = None
    task: ZeroShotTask | None = None

    def __post_init__(self) -> None:
        if not callable(self.evaluator):
            raise TypeError(
                f"evaluator {self.evaluator!r} is neither an Evaluator nor a callable "
                "model -> score"
            )
        if self.task is not None and self.classnames is not None:
            raise ValueError("a TaskSpec takes either a ZeroShotTask or classnames, not both")
        if self.classnames is not None and (self.templates is None or self.tokenizer is None):
            raise ValueError(
                "a TaskSpec with classnames needs templates and a tokenizer to build its head"
            )

    @property
    def swaps_head(self) -> bool:
        """Whether this task is scored with its own zero-shot head."""
        return self.classnames is not None


EvalSet = TaskSpec | Evaluator | Callable[[nn.Module], EvalResult | float]


def as_task(eval_set: EvalSet) -> TaskSpec:
    """Wrap an Evaluator or callable as a :class:`TaskSpec` that keeps the model's head."""
    return eval_set if isinstance(eval_set, TaskSpec) else TaskSpec(eval_set)


def result_score(result: EvalResult | float) -> float:
    """The score of a result: an EvalResult's primary metric, or the number itself."""
    return float(result.score) if isinstance(result, EvalResult) else float(result)


def result_interval(result: EvalResult | float) -> tuple[float, float] | None:
    """The confidence interval of an EvalResult's primary metric, when it has one."""
    if not isinstance(result, EvalResult):
        return None
    key = result.primary_metric or next(iter(result.metrics))
    interval = result.intervals.get(key)
    return None if interval is None else (float(interval[0]), float(interval[1]))


@dataclass
class SweepResult:
    """Scores of the interpolated models, per eval set, one per ``alpha``.

    Attributes:
        alphas: the swept coefficients, in order.
        results: eval set name -> one result per ``alpha`` (the ``EvalResult``s are kept, with
            their per-example outcomes and intervals, or the floats a callable returned).
        zero_shot: display name of the zero-shot end; fine_tuned: of the fine-tuned end.
    """

    alphas: list[float]
    results: dict[str, list[EvalResult | float]]
    zero_shot: str = "zero-shot"
    fine_tuned: str = "fine-tuned"

    @property
    def scores(self) -> dict[str, list[float]]:
        """Eval set name -> score per ``alpha``."""
        return {name: [result_score(r) for r in results] for name, results in self.results.items()}

    def score(self, eval_set: str, alpha: float) -> float:
        """The score of eval set ``eval_set`` at coefficient ``alpha``."""
        try:
            return self.scores[eval_set][self.alphas.index(float(alpha))]
        except ValueError:
            raise KeyError(f"alpha={alpha} was not swept (swept: {self.alphas})") from None

    def table(self) -> str:
        """A plain-text table: one row per ``alpha``, one column per eval set."""
        names = list(self.results)
        width = max([8, *(len(name) for name in names)])
        lines = ["alpha".ljust(7) + "".join(name.rjust(width + 2) for name in names)]
        scores = self.scores
        for i, alpha in enumerate(self.alphas):
            row = f"{alpha:<7.3g}" + "".join(
                f"{scores[name][i]:.4f}".rjust(width + 2) for name in names
            )
            lines.append(row)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record: alphas, scores, and each EvalResult's summary (with intervals)."""
        return {
            "zero_shot": self.zero_shot,
            "fine_tuned": self.fine_tuned,
            "alphas": list(self.alphas),
            "scores": self.scores,
            "results": {
                name: [r.to_dict() if isinstance(r, EvalResult) else {"score": r} for r in results]
                for name, results in self.results.items()
            },
        }


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """Validate swept coefficients: at least one, finite, no duplicates."""
    alphas = [check_alpha(alpha) for alpha in alphas]
    if not alphas:
        raise ValueError("alphas is empty: give at least one mixing coefficient")
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"alphas has duplicates: {alphas}")
    return alphas


class _Heads:
    """Builds (and, when the text tower cannot change with alpha, caches) task heads."""

    def __init__(self, endpoints: Endpoints):
        text_side_changed = sorted(
            name for name in endpoints.changed if not name.startswith(_IMAGE_SIDE_PREFIXES)
        )
        self.cacheable = not text_side_changed
        if text_side_changed:
            logger.info(
                "tensor %r (and %d more) outside the image tower changed in fine-tuning; "
                "task heads are rebuilt at every alpha",
                text_side_changed[0],
                len(text_side_changed) - 1,
            )
        self._cache: dict[str, torch.Tensor] = {}

    def swap_in(self, name: str, task: TaskSpec, model: nn.Module) -> None:
        if not (hasattr(model, "build_head") and hasattr(model, "set_head")):
            raise UnsupportedArchitectureError(
                f"eval set {name!r} names classes, so its zero-shot head must be swapped in, but "
                f"{type(model).__name__} has no build_head/set_head (a CLIP classifier of "
                "hf_soups.models has)"
            )
        head = self._cache.get(name)
        if head is None:
            head = model.build_head(task.tokenizer, task.classnames, task.templates, progress=False)
            if self.cacheable:
                self._cache[name] = head
        model.set_head(head, task.classnames)


def sweep(
    zero_shot: IngredientLike | Endpoints,
    fine_tuned: IngredientLike | None,
    alphas: Sequence[float],
    eval_sets: Mapping[str, EvalSet],
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SweepResult:
    """Score ``theta(alpha) = (1 - alpha) * zero_shot + alpha * fine_tuned`` at each ``alpha``.

    Args:
        zero_shot: the zero-shot model (folder, Hub id or Ingredient), or ready
            :class:`Endpoints` (then ``fine_tuned`` is ``None``).
        fine_tuned: the fine-tuned model.
        alphas: coefficients to score, e.g. ``[0, 0.1, ..., 1]``.
        eval_sets: name -> :class:`TaskSpec`, Evaluator or callable ``model -> score``.
        device: move each model there before building heads and scoring (Evaluators also move
            it to their accelerator's device).
        progress: show a progress bar over alphas.

    Returns:
        A :class:`SweepResult` with every score and EvalResult.
    """
    if isinstance(zero_shot, Endpoints):
        if fine_tuned is not None:
            raise ValueError("give either Endpoints or (zero_shot, fine_tuned), not both")
        endpoints = zero_shot
    else:
        endpoints = Endpoints(zero_shot, fine_tuned)
    alphas = check_alphas(alphas)
    if not eval_sets:
        raise ValueError("eval_sets is empty: give at least one eval set")
    tasks = {name: as_task(eval_set) for name, eval_set in eval_sets.items()}
    # The model's own head is overwritten by the first swap, so own-head tasks go first.
    order = sorted(tasks, key=lambda name: tasks[name].swaps_head)
    heads = _Heads(endpoints)
    results: dict[str, list[EvalResult | float]] = {name: [] for name in tasks}

    def load(state_dict: dict[str, torch.Tensor], task: ZeroShotTask | None) -> nn.Module:
        loaded = load_model(endpoints.zero_shot, state_dict=state_dict, task=task)
        return loaded if device is None else loaded.to(device)

    for alpha in tqdm(alphas, desc="WiSE-FT sweep", unit="alpha", disable=not progress):
        state_dict = endpoints.state_dict(alpha)
        model = None
        for name in order:
            task = tasks[name]
            if task.task is not None:  # a model of its own, its head built from the task
                scored = load(state_dict, task.task)
            else:
                model = model if model is not None else load(state_dict, None)
                scored = model
                if task.swaps_head:
                    heads.swap_in(name, task, model)
            value, result = as_scorer(task.evaluator)(scored, f"{name} (alpha={alpha:g})")
            results[name].append(value if result is None else result)
            del scored
        logger.info(
            "alpha=%g: %s",
            alpha,
            ", ".join(f"{name} {result_score(results[name][-1]):.4f}" for name in tasks),
        )
        del model
    return SweepResult(
        alphas=alphas,
        results=results,
        zero_shot=endpoints.zero_shot.name,
        fine_tuned=endpoints.fine_tuned.name,
    )
