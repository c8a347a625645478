"""Model soups (Wortsman et al., "Model soups", ICML 2022, arXiv:2203.05482).

:class:`SoupBuilder` holds fine-tuned ingredients that share one pre-trained start and cooks
them: :meth:`~SoupBuilder.uniform`, :meth:`~SoupBuilder.greedy` and
:meth:`~SoupBuilder.learned`, or with a merge method (:meth:`~SoupBuilder.merge_method`: TIES,
DARE, task arithmetic, Fisher; :meth:`~SoupBuilder.model_stock`). Each returns a :class:`Soup`,
which records its ingredients (with resolved revisions), its weights, the method and every score
measured on the way, and which saves itself through the streaming merge.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hf_soups.errors import HfSoupsError, InvalidWeightsError, MissingBaseError
from hf_soups.evaluation import EvalResult, Evaluator
from hf_soups.ingredients import INGREDIENT_METADATA_FILE, Ingredient, check_compatible
from hf_soups.merge import (
    RECIPE_FILE,
    IngredientLike,
    as_ingredients,
    build_recipe,
    copy_extra_files,
    merge,
    weighted_state_dict,
)
from hf_soups.methods import get_method
from hf_soups.methods.base import MergeMethod, WeightedAverage
from hf_soups.models import ZeroShotTask, load_model, save_model
from hf_soups.output import atomic_output_dir
from hf_soups.stats import gain_is_significant

if TYPE_CHECKING:
    from hf_soups.diagnostics import DiagnosticsReport

logger = logging.getLogger(__name__)

SOUPS_CITATION = (
    "Wortsman et al., Model soups: averaging weights of multiple fine-tuned models improves "
    "accuracy without increasing inference time, ICML 2022 (arXiv:2203.05482)"
)
ScoreFunction = Callable[[nn.Module], float]


@dataclass
class Soup:
    """A recipe over ingredients, with the scores measured while it was made.

    Attributes:
        ingredients: the ingredients the soup is made of (only the kept ones for greedy).
        weights: one mixing weight per ingredient (for per-layer learned soups, the mean weight;
            the per-tensor weights live in ``tensor_weights``; empty for a merge method, whose
            rule and parameters are ``merge_method``'s).
        method: ``"uniform"``, ``"greedy"``, ``"learned"``, ``"learned_by_layer"``, or the name
            of a merge method.
        scores: model name -> eval set name -> ``EvalResult.to_dict()``; every score measured by
            the builder so far (ingredients, other soups, the ensemble).
        details: method-specific record (greedy trace, learned coefficients, ...).
        merge_method: the rule of a merge-method soup (TIES, Model Stock, ...); ``None`` for a
            weighted average with ``weights``.
        base: the pre-trained model the merge method works from, if it needs one.
    """

    ingredients: list[Ingredient]
    weights: list[float]
    method: str
    scores: dict[str, dict[str, dict]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    merge_method: MergeMethod | None = None
    base: Ingredient | None = None
    tensor_weights: dict[str, list[float]] | None = field(default=None, repr=False)
    diagnostics: DiagnosticsReport | None = field(default=None, repr=False)
    task: ZeroShotTask | None = None

    @property
    def name(self) -> str:
        return f"{self.method} soup"

    def _method(self) -> MergeMethod:
        return self.merge_method or WeightedAverage(self.weights)

    def recipe(self) -> dict:
        """What ``soup.json`` records beyond the merge itself."""
        return {
            "soup": {
                "method": self.method,
                "weights": self.weights,
                "citation": self.merge_method.citation if self.merge_method else SOUPS_CITATION,
                **self.details,
            },
            "scores": self.scores,
            **({"task": self.task.to_dict()} if self.task is not None else {}),
            **(self._diagnostics_record() if self.diagnostics is not None else {}),
        }

    def _diagnostics_record(self) -> dict:
        from hf_soups.diagnostics.plots import plot_names

        return {
            "diagnostics": self.diagnostics.to_dict(),
            "plots": plot_names(self.diagnostics),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The soup's weights in memory, keyed as on disk (not for per-layer learned soups,
        whose weights are keyed by the model's parameter names: use :meth:`to_model`)."""
        if self.tensor_weights is not None:
            raise HfSoupsError("a per-layer learned soup is built as a model: use to_model()")
        return weighted_state_dict(self.ingredients, method=self._method(), base=self.base)

    def to_model(self) -> nn.Module:
        """The soup as an in-memory model, in eval mode."""
        if self.tensor_weights is None:
            return load_model(self.ingredients[0], self.state_dict(), task=self.task)
        from hf_soups.learned import combine, stack_ingredients

        model, stacked = stack_ingredients(self.ingredients, task=self.task)
        alpha = torch.tensor([self.tensor_weights[name] for name in stacked])
        model.load_state_dict(combine(stacked, alpha), strict=False)
        return model.eval()

    def evaluate(self, evaluators: Mapping[str, Evaluator]) -> dict[str, EvalResult]:
        """Score the soup on named eval sets; the scores are recorded in ``self.scores``."""
        model = self.to_model()
        results = {
            name: evaluator.evaluate(model, name=self.name)
            for name, evaluator in evaluators.items()
        }
        self.scores.setdefault(self.name, {}).update(
            {name: result.to_dict() for name, result in results.items()}
        )
        return results

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        *,
        overwrite: bool = False,
        max_shard_size: int | str = "5GB",
        dtype: torch.dtype | None = None,
        progress: bool = True,
    ) -> Path:
        """Write the soup as a model folder through the streaming merge, recipe included.

        A per-layer learned soup is built in memory and written with the model's own
        ``save_pretrained``.
        """
        with atomic_output_dir(out_dir, overwrite=overwrite) as work_dir:
            if self.tensor_weights is not None:
                self._save_model(work_dir, dtype=dtype)
            else:
                merge(
                    self.ingredients,
                    work_dir,
                    method=self._method(),
                    base=self.base,
                    dtype=dtype,
                    max_shard_size=max_shard_size,
                    recipe=self.recipe(),
                    progress=progress,
                )
            if self.diagnostics is not None:
                from hf_soups.diagnostics import write_plots

                write_plots(self.diagnostics, work_dir)
        return Path(out_dir)

    def _save_model(self, work_dir: Path, *, dtype: torch.dtype | None) -> None:
        model = self.to_model()
        if dtype is not None:
            model.to(dtype)
        saved = save_model(model, work_dir / "model")
        for file in saved.iterdir():
            file.rename(work_dir / file.name)
        saved.rmdir()
        copy_extra_files(self.ingredients[0].path, work_dir, keep_existing=True)
        record = build_recipe(self.ingredients, self._method(), None, dtype)
        record.update(self.recipe())
        (work_dir / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        work_dir: str | os.PathLike | None = None,
    ) -> Any:
        """Save the soup with its model card and upload it to the Hub in one commit."""
        import tempfile

        from hf_soups.cards import write_card
        from hf_soups.push import push_folder

        with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
            folder = self.save_pretrained(Path(scratch) / "soup", progress=False)
            write_card(folder)
            return push_folder(
                folder,
                repo_id,
                private=private,
                token=token,
                commit_message=commit_message or f"Upload {self.name} made with hf_soups",
                revision=revision,
            )

    def report(self) -> str:
        """A markdown table of every score recorded (see :func:`hf_soups.report.results_table`)."""
        from hf_soups.report import results_table

        return results_table(self.scores)


def _score(evaluator: Evaluator | ScoreFunction, model: nn.Module, name: str, metric: str | None):
    """Score a model; returns ``(value, EvalResult or None)``."""
    if isinstance(evaluator, Evaluator):
        result = evaluator.evaluate(model, name=name)
        return (result.metrics[metric] if metric else result.score), result
    if callable(evaluator):
        return float(evaluator(model)), None
    raise TypeError(
        f"evaluator: expected an Evaluator or a callable model -> float, got "
        f"{type(evaluator).__name__}"
    )


class SoupBuilder:
    """Builds soups from ingredients fine-tuned from one pre-trained start.

    Example::

        builder = SoupBuilder.from_hub(["org/ft-lr1e-5", "org/ft-lr3e-5@v1.0", "./ft-seed2"])
        soup = builder.greedy(Evaluator(held_out))
        soup.save_pretrained("greedy-soup")
    """

    def __init__(self, ingredients: Sequence[Ingredient], *, task: ZeroShotTask | None = None):
        self.ingredients = list(ingredients)
        self.task = task
        if len(self.ingredients) < 1:
            raise HfSoupsError("a soup needs at least one ingredient")
        check_compatible(self.ingredients)
        names = [ingredient.name for ingredient in self.ingredients]
        if len(set(names)) != len(names):
            raise HfSoupsError(f"ingredients are given twice: {names}")
        self.scores: dict[str, dict[str, dict]] = {}
        self._individual: dict[str, float] = {}
        self._individual_results: dict[str, EvalResult] = {}
        self._scored_with: tuple | None = None  # (evaluator, metric) of the individual scores
        self._maximize = True
        self.diagnostics: DiagnosticsReport | None = None

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
        return cls(ingredients, task=task)

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
            value, result = _score(
                evaluator, load_model(ingredient, task=self.task), ingredient.name, metric
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

    def _soup(self, ingredients, weights, method, details=None, **kwargs) -> Soup:
        return Soup(
            ingredients=list(ingredients),
            weights=list(weights),
            method=method,
            scores=self.scores,
            details=details or {},
            diagnostics=self.diagnostics,
            task=self.task,
            **kwargs,
        )

    # -- recipes --------------------------------------------------------------------------

    def uniform(self) -> Soup:
        """The uniform soup: every ingredient with weight 1/N."""
        n = len(self.ingredients)
        return self._soup(self.ingredients, [1 / n] * n, "uniform")

    def weighted(self, weights: Sequence[float]) -> Soup:
        """A soup with given mixing weights (one per ingredient)."""
        if len(weights) != len(self.ingredients):
            raise InvalidWeightsError(
                f"weights: got {len(weights)} for {len(self.ingredients)} ingredients"
            )
        return self._soup(self.ingredients, weights, "weighted")

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
        """The greedy soup, as the official mlfoundations/model-soups code makes it.

        Score every ingredient on held-out data, sort best first, start the soup with the best,
        then make one pass over the rest: add an ingredient to the uniform average only if the
        held-out score of the soup with it beats the current soup's. A float32 running sum is
        kept, so each ingredient's weights are read once in the pass.

        Args:
            evaluator: an :class:`Evaluator` on held-out data, or a callable ``model -> float``.
            metric: which metric of the Evaluator to use (default: its primary metric).
            maximize: ``False`` for metrics to minimise (a loss).
            strict: accept only a strictly better score (the paper's ``>``); ``False`` accepts
                ties (``>=``).
            min_gain: a tolerance: the gain must exceed it (may be negative to accept
                ingredients that cost at most that much).
            noise_aware: also require the gain to be distinguishable from noise: an exact
                McNemar test on the held-out examples at level ``significance`` (needs an
                Evaluator with an accuracy-like metric). The paper's rule is the default.
            max_size: stop once the soup has this many ingredients.
        """
        if noise_aware and not isinstance(evaluator, Evaluator):
            raise ValueError("noise_aware=True needs an Evaluator (per-example predictions)")
        sign = 1.0 if maximize else -1.0
        self._maximize = maximize
        eval_name = getattr(evaluator, "name", "held_out")
        if self._scored_with != (evaluator, metric):
            self.score_ingredients(evaluator, metric=metric)
        self._record_best_individual()
        order = sorted(self.ingredients, key=lambda i: -sign * self._individual[i.name])
        best = order[0]
        kept = [best]
        running_sum = {
            name: tensor.to(torch.float32)
            for name, tensor in best.state_dict().items()
            if tensor.is_floating_point()
        }
        best_score = self._individual[best.name]
        best_result = self._individual_results.get(best.name)
        trace = [_trace_entry(best, best_score, best_score, True, "best individual")]
        for candidate in order[1:]:
            individual = self._individual[candidate.name]
            if max_size is not None and len(kept) >= max_size:
                trace.append(_trace_entry(candidate, individual, None, False, "max_size reached"))
                continue
            candidate_tensors = {
                name: tensor.to(torch.float32)
                for name, tensor in candidate.state_dict().items()
                if tensor.is_floating_point()
            }
            k = len(kept) + 1
            soup_state = {
                name: (running_sum[name] + t) / k for name, t in candidate_tensors.items()
            }
            model = load_model(best, _complete(soup_state, best), task=self.task)
            score, result = _score(evaluator, model, f"greedy soup + {candidate.name}", metric)
            gain = sign * (score - best_score)
            accepted = gain > min_gain if strict else gain >= min_gain
            reason = f"gain {gain:+.4g}"
            if accepted and noise_aware:
                accepted = gain_is_significant(result, best_result, "mcnemar", significance)
                reason += ", significant" if accepted else ", within noise (McNemar)"
            trace.append(_trace_entry(candidate, individual, score, accepted, reason))
            logger.info(
                "greedy: + %s -> %.4g (%s)%s",
                candidate.name,
                score,
                reason,
                ", kept" if accepted else "",
            )
            if accepted:
                kept.append(candidate)
                best_score, best_result = score, result
                for name, tensor in candidate_tensors.items():
                    running_sum[name] += tensor
        if len(kept) == 1 and len(self.ingredients) > 1:
            logger.warning(
                "Greedy soup kept only the best ingredient (%s): adding any other did not raise "
                "the held-out score. On small pools this is common; try more diverse ingredients "
                "(a wider learning-rate range), strict=False or a negative min_gain, or compare "
                "with the uniform soup.",
                best.name,
            )
        soup = self._soup(
            kept,
            [1 / len(kept)] * len(kept),
            "greedy",
            {
                "metric": metric or "score",
                "maximize": maximize,
                "acceptance": {"strict": strict, "min_gain": min_gain, "noise_aware": noise_aware},
                "held_out": eval_name,
                "greedy_trace": trace,
                "candidates": [ingredient.record() for ingredient in order],
            },
        )
        self._record(soup.name, eval_name, best_result, best_score)
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
        if method.needs_base and base is None:
            raise MissingBaseError(f"method {name!r} needs base= (the pre-trained model)")
        if base is not None and not method.needs_base:
            raise ValueError(f"method {name!r} does not use a base model; drop base=")
        method.check(len(self.ingredients))
        base_ingredient = as_ingredients([base])[0] if base is not None else None
        if base_ingredient is not None:
            check_compatible([*self.ingredients, base_ingredient])
        return self._soup(
            self.ingredients,
            [],
            name,
            merge_method=method,
            base=base_ingredient,
        )

    def model_stock(self, base: IngredientLike) -> Soup:
        """Model Stock (Jang et al., ECCV 2024): per tensor, interpolate between ``base`` and
        the ingredients' mean with a ratio given by the angle between their deltas; a soup with
        no held-out search (``merge_method("model_stock", base=base)``)."""
        return self.merge_method("model_stock", base=base)

    def learned(self, dataset, *, by_layer: bool = False, **fit_kwargs) -> Soup:
        """The learned soup: mixing coefficients fitted by gradient on held-out data.

        Holds every ingredient in memory (the official run needed about 490 GB of RAM for 72
        ViT-B/32 models); see :func:`hf_soups.learned.fit_mixing_coefficients` for the options.
        ``by_layer=True`` learns one coefficient per model per tensor ("learned soup+layer").
        """
        from hf_soups.learned import fit_mixing_coefficients

        fit_kwargs.setdefault("task", self.task)
        fit = fit_mixing_coefficients(self.ingredients, dataset, by_layer=by_layer, **fit_kwargs)
        method = "learned_by_layer" if by_layer else "learned"
        return self._soup(
            self.ingredients,
            fit.model_weights,
            method,
            {"coefficients": fit.to_dict()},
            tensor_weights=fit.tensor_weights if by_layer else None,
        )


def _trace_entry(ingredient, individual, soup_score, kept, reason) -> dict:
    return {
        "ingredient": ingredient.name,
        "individual_score": individual,
        "soup_score": soup_score,
        "kept": kept,
        "reason": reason,
    }


def _complete(state: dict[str, torch.Tensor], template: Ingredient) -> dict[str, torch.Tensor]:
    """Cast float32 soup tensors to the template's dtypes and add its non-float buffers."""
    return {
        name: state[name].to(info.dtype) if name in state else template.read(name)
        for name, info in template.tensors.items()
    }
