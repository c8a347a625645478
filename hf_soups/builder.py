"""The soup builder: ingredients in, soups out (uniform, greedy, learned, merge methods).

:class:`SoupBuilder` holds fine-tuned ingredients that share one pre-trained start, scores them
and cooks :class:`~hf_soups.soup.Soup` objects; see :mod:`hf_soups.soup`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from hf_soups.distributed import check_agreement
from hf_soups.errors import HfSoupsError, InvalidWeightsError
from hf_soups.evaluation import EvalResult, Evaluator, as_scorer
from hf_soups.greedy import AcceptanceRule, greedy_pass
from hf_soups.ingredients import (
    INGREDIENT_METADATA_FILE,
    Ingredient,
    check_compatible,
    check_distinct,
)
from hf_soups.merge import (
    IngredientLike,
    as_ingredients,
)
from hf_soups.methods import get_method
from hf_soups.methods.base import MergeMethod, WeightedAverage, check_method_inputs
from hf_soups.models import ZeroShotTask, load_model
from hf_soups.pruning.soup_mask import soup_mask
from hf_soups.recipe.schema import SoupRecord
from hf_soups.soup import SOUPS_CITATION, Soup

if TYPE_CHECKING:
    from hf_soups.diagnostics import DiagnosticsReport

logger = logging.getLogger(__name__)

ScoreFunction = Callable[[nn.Module], float]


class SoupBuilder:
    """Builds soups from ingredients fine-tuned from one pre-trained start.

    Example::

        builder = SoupBuilder.from_hub(["org/ft-lr1e-5", "org/ft-lr3e-5@v1.0", "./ft-seed2"])
        soup = builder.greedy(Evaluator(held_out))
        soup.save_pretrained("greedy-soup")
    """

    def __init__(
        self,
        ingredients: Sequence[Ingredient],
        *,
        task: ZeroShotTask | None = None,
        masks: str = "shared",
    ):
        """``masks``: for pruned ingredients (``pruning_mask.safetensors``), ``"shared"`` keeps
        their common mask in every soup and refuses differing ones; ``"intersection"`` masks
        each soup by the weights all its ingredients keep."""
        self.ingredients = list(ingredients)
        self.task = task
        self.mask_rule = masks
        if len(self.ingredients) < 1:
            raise HfSoupsError("a soup needs at least one ingredient")
        check_compatible(self.ingredients)
        check_distinct(self.ingredients)
        self.scores: dict[str, dict[str, dict]] = {}
        self._individual: dict[str, float] = {}
        self._individual_results: dict[str, EvalResult] = {}
        self._scored_with: tuple | None = None  # (evaluator, metric) of the individual scores
        self._maximize = True
        self.diagnostics: DiagnosticsReport | None = None
        self.mask = soup_mask(self.ingredients, masks)
        if self.mask is not None:
            logger.info("Sparse ingredients: soups keep their %s mask", self.mask.rule)

    @classmethod
    def from_hub(
        cls,
        sources: Sequence[str],
        *,
        revisions: Sequence[str | None] | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        allow_pickle: bool = False,
        weights_format: str | None = None,
        task: ZeroShotTask | None = None,
        max_workers: int = 4,
        masks: str = "shared",
    ) -> SoupBuilder:
        """Fetch ingredients from the Hub (or local folders) in parallel.

        Args:
            sources: Hub ids ``org/name`` or ``org/name@revision``, or local folders.
            revisions: one revision per source (overrides ``@revision`` only if they agree).
            token: Hub token (default: ``HF_TOKEN`` or the cached login).
            cache_dir, local_files_only: as in ``huggingface_hub.snapshot_download``.
            allow_pickle: accept ``.bin`` checkpoints (``torch.load(weights_only=True)``).
            weights_format: ``"transformers"`` (the default) or ``"open_clip"``, for repos
                holding both (the laion CLIP repos).
            task: class names and templates to score CLIP ingredients (see
                :class:`~hf_soups.models.ZeroShotTask`).
            masks: how soups of pruned ingredients are masked (see ``__init__``).
        """
        revisions = list(revisions) if revisions is not None else [None] * len(sources)
        if len(revisions) != len(sources):
            raise ValueError(f"revisions: {len(revisions)} given for {len(sources)} sources")

        def fetch(pair):
            source, revision = pair
            return Ingredient.from_source(
                source,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                allow_pickle=allow_pickle,
                weights_format=weights_format,
            )

        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            ingredients = list(pool.map(fetch, zip(sources, revisions)))
        return cls(ingredients, task=task, masks=masks)

    @classmethod
    def from_pretrained(
        cls, sources: str | os.PathLike | Sequence[str | os.PathLike], **kwargs
    ) -> SoupBuilder:
        """Ingredients from folders or Hub ids; a single folder whose subfolders hold
        ``ingredient.json`` files (what :class:`~hf_soups.callbacks.IngredientCallback` writes
        during a sweep) gives all of them."""
        if isinstance(sources, (str, os.PathLike)):
            sweep = Path(sources)
            found = sorted(p.parent for p in sweep.glob(f"*/{INGREDIENT_METADATA_FILE}"))
            if not found:
                raise HfSoupsError(f"{sweep}: no subfolder with {INGREDIENT_METADATA_FILE}")
            sources = [str(folder) for folder in found]
        return cls.from_hub(list(map(str, sources)), **kwargs)

    def check(
        self, evaluator: Evaluator | None = None, *, base: IngredientLike | None = None, **options
    ) -> DiagnosticsReport:
        """Will averaging work? Measure the pool (weight distances, and interpolation barriers
        when an ``evaluator`` is given) and log a warning for every ingredient that fails;
        nothing is dropped. The report is recorded in every soup built afterwards (its
        ``soup.json``, plots and model card). Options: those of
        :func:`hf_soups.diagnostics.check_soupability`.
        """
        from hf_soups.diagnostics import check_soupability

        options.setdefault("task", self.task)
        self.diagnostics = check_soupability(
            self.ingredients, base=base, evaluator=evaluator, **options
        )
        return self.diagnostics

    # -- scoring --------------------------------------------------------------------------

    def _record(self, model_name: str, eval_name: str, result: EvalResult | None, value: float):
        entry = result.to_dict() if result is not None else {"score": value}
        self.scores.setdefault(model_name, {})[eval_name] = entry

    def score_ingredients(
        self, evaluator: Evaluator | ScoreFunction, *, metric: str | None = None
    ) -> dict[str, float]:
        """Score every ingredient alone (each read once); recorded under its name."""
        eval_name = getattr(evaluator, "name", "held_out")
        for ingredient in self.ingredients:
            value, result = as_scorer(evaluator, metric)(
                load_model(ingredient, task=self.task), ingredient.name
            )
            self._individual[ingredient.name] = value
            if result is not None:
                self._individual_results[ingredient.name] = result
            self._record(ingredient.name, eval_name, result, value)
        self._scored_with = (evaluator, metric)
        self._record_best_individual()
        return dict(self._individual)

    def evaluate_ingredients(self, evaluators: Mapping[str, Evaluator]) -> None:
        """Score every ingredient on named eval sets (for the report; choices never use them).

        Loads one ingredient at a time. Once the held-out scores are known, the row
        ``"best individual"`` repeats the scores of the ingredient best on held-out data.
        """
        for ingredient in self.ingredients:
            model = load_model(ingredient, task=self.task)
            for eval_name, evaluator in evaluators.items():
                result = evaluator.evaluate(model, name=ingredient.name)
                self._record(ingredient.name, eval_name, result, result.score)
        self._record_best_individual()

    @property
    def best_individual(self) -> str | None:
        """Name of the ingredient with the best held-out score (None before scoring)."""
        if not self._individual:
            return None
        sign = 1.0 if self._maximize else -1.0
        return max(self._individual, key=lambda name: sign * self._individual[name])

    def _record_best_individual(self) -> None:
        best = self.best_individual
        if best is None:
            return
        self.scores["best individual"] = {
            eval_name: {**entry, "model": best} for eval_name, entry in self.scores[best].items()
        }

    def ensemble(self, evaluator: Evaluator) -> EvalResult:
        """The logit ensemble of all ingredients: the paper's baseline, at N times the cost.

        Holds every ingredient's model in memory at once.
        """
        models = [load_model(ingredient, task=self.task) for ingredient in self.ingredients]
        result = evaluator.evaluate_ensemble(models, name="ensemble")
        self._record("ensemble", evaluator.name, result, result.score)
        return result

    def _soup(
        self, ingredients: Sequence[Ingredient], method: MergeMethod, record: SoupRecord, **kwargs
    ) -> Soup:
        return Soup(
            ingredients=list(ingredients),
            method=method,
            record=record,
            scores=self.scores,
            diagnostics=self.diagnostics,
            task=self.task,
            mask_rule=self.mask_rule,
            **kwargs,
        )

    def _weighted(self, ingredients, weights, soup_method: str, **record) -> Soup:
        return self._soup(
            ingredients,
            WeightedAverage(weights),
            SoupRecord(
                method=soup_method, citation=SOUPS_CITATION, weights=list(weights), **record
            ),
        )

    # -- recipes --------------------------------------------------------------------------

    def uniform(self) -> Soup:
        """The uniform soup: every ingredient with weight 1/N."""
        n = len(self.ingredients)
        return self._weighted(self.ingredients, [1 / n] * n, "uniform")

    def weighted(self, weights: Sequence[float]) -> Soup:
        """A soup with given mixing weights (one per ingredient)."""
        if len(weights) != len(self.ingredients):
            raise InvalidWeightsError(
                f"weights: got {len(weights)} for {len(self.ingredients)} ingredients"
            )
        return self._weighted(self.ingredients, [float(w) for w in weights], "weighted")

    def greedy(
        self,
        evaluator: Evaluator | ScoreFunction,
        *,
        metric: str | None = None,
        maximize: bool = True,
        strict: bool = True,
        min_gain: float = 0.0,
        noise_aware: bool = False,
        significance: float = 0.05,
        max_size: int | None = None,
    ) -> Soup:
        """The greedy soup, as the official mlfoundations/model-soups code makes it
        (see :mod:`hf_soups.greedy`).

        Args:
            evaluator: an :class:`Evaluator` on held-out data, or a callable ``model -> float``.
            metric: which metric of the Evaluator to use (default: its primary metric).
            maximize: ``False`` for metrics to minimise (a loss).
            strict: accept only a strictly better score (the paper's ``>``); ``False`` accepts
                ties (``>=``).
            min_gain: a tolerance: the gain must exceed it (may be negative to accept
                ingredients that cost at most that much).
            noise_aware: also require the gain in ``metric`` to be distinguishable from noise
                at level ``significance`` (:func:`hf_soups.stats.gain_is_significant`: exact
                McNemar for 0/1 per-example values, else a paired bootstrap; needs an Evaluator
                whose metric has per-example values). The paper's rule is the default.
            max_size: stop once the soup has this many ingredients.
        """
        if noise_aware and not isinstance(evaluator, Evaluator):
            raise ValueError("noise_aware=True needs an Evaluator (per-example predictions)")
        self._maximize = maximize
        eval_name = getattr(evaluator, "name", "held_out")
        if self._scored_with != (evaluator, metric):
            self.score_ingredients(evaluator, metric=metric)
        self._record_best_individual()
        rule = AcceptanceRule(
            maximize, strict, min_gain, noise_aware, significance, max_size, metric
        )
        result = greedy_pass(
            self.ingredients,
            self._individual,
            self._individual_results,
            as_scorer(evaluator, metric),
            lambda template, state: load_model(template, state, task=self.task),
            rule,
            intersect_masks=self.mask is not None and self.mask_rule == "intersection",
        )
        check_agreement([i.name for i in result.kept], "the greedy soup's kept ingredients")
        n = len(result.kept)
        soup = self._weighted(
            result.kept,
            [1 / n] * n,
            "greedy",
            metric=metric or "score",
            maximize=maximize,
            held_out=eval_name,
            acceptance=rule.to_dict(),
            candidates=[ingredient.record() for ingredient in result.order],
            greedy_trace=result.trace,
        )
        self._record(soup.name, eval_name, result.result, result.score)
        return soup

    def merge_method(self, name: str, *, base: IngredientLike | None = None, **params) -> Soup:
        """A soup made by a merge method of :data:`hf_soups.methods.METHODS` (``"ties"``,
        ``"task_arithmetic"``, ``"dare_linear"``, ``"dare_ties"``, ``"model_stock"``,
        ``"fisher"``), built with ``params`` by :func:`~hf_soups.methods.get_method`.

        No held-out data is used. Saving the soup streams the method through the merge engine
        and records the method, its parameters and its paper in ``soup.json``.

        Args:
            name: the method's registered name.
            base: the pre-trained model the fine-tunes started from (an :class:`Ingredient`,
                folder or Hub id); required by the methods that work on task vectors.
            params: the method's parameters (``density=0.2``, ``scaling=1.0``, ``seed=0``...).

        Raises:
            ValueError: the name is unknown, a parameter is not one the method takes (the
                message lists those it takes), or ``base`` is given to a method that has no use
                for it.
            MissingBaseError: the method needs ``base`` and none is given.
        """
        if name == WeightedAverage.name:
            raise ValueError(f"method {name!r}: use SoupBuilder.uniform() or .weighted(weights)")
        method = get_method(name, **params)
        check_method_inputs(method, len(self.ingredients), base is not None)
        base_ingredient = as_ingredients([base])[0] if base is not None else None
        if base_ingredient is not None:
            check_compatible([*self.ingredients, base_ingredient])
        record = SoupRecord(method=name, citation=method.citation)
        return self._soup(self.ingredients, method, record, base=base_ingredient)

    def model_stock(self, base: IngredientLike) -> Soup:
        """Model Stock (Jang et al., ECCV 2024): per tensor, interpolate between ``base`` and
        the ingredients' mean with a ratio given by the angle between their deltas; a soup with
        no held-out search (``merge_method("model_stock", base=base)``)."""
        return self.merge_method("model_stock", base=base)

    def learned(self, dataset, *, by_layer: bool = False, **fit_kwargs) -> Soup:
        """The learned soup: mixing coefficients fitted by gradient on held-out data.

        By default the ingredients are streamed from their files at every step (memory: one
        model's weights and gradients, whatever the number of ingredients) or stacked in memory
        when they fit (``memory="auto"``); the official code held all of them (about 490 GB of
        RAM for 72 ViT-B/32 models). ``by_layer=True`` learns one coefficient per model per
        tensor ("learned soup+layer"), replayed by :class:`~hf_soups.methods.PerTensorWeights`.
        Options (``memory``, ``coefficients="hyperplane"``, ``block_size``, ``epochs``, ...):
        see :func:`hf_soups.learned.fit_mixing_coefficients`; they are recorded with the
        coefficients in the soup's recipe. Under ``accelerate launch`` the processes share the
        held-out data and fit the coefficients one process would.
        """
        from hf_soups.learned import fit_mixing_coefficients, per_tensor_method

        fit_kwargs.setdefault("task", self.task)
        fit = fit_mixing_coefficients(self.ingredients, dataset, by_layer=by_layer, **fit_kwargs)
        if not by_layer:
            return self._weighted(
                self.ingredients, fit.model_weights, "learned", coefficients=fit.to_dict()
            )
        record = SoupRecord(
            method="learned_by_layer",
            citation=SOUPS_CITATION,
            weights=fit.model_weights,
            coefficients=fit.to_dict(),
        )
        method = per_tensor_method(
            self.ingredients[0], fit.tensor_weights, fit.model_weights, task=self.task
        )
        return self._soup(self.ingredients, method, record, tensor_weights=fit.tensor_weights)
