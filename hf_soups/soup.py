"""Model soups (Wortsman et al., "Model soups", ICML 2022, arXiv:2203.05482).

:class:`~hf_soups.builder.SoupBuilder` holds fine-tuned ingredients that share one pre-trained
start and cooks them: ``uniform()``, ``greedy()`` and ``learned()``, or with a merge method
(``merge_method()``: TIES, DARE, task arithmetic, Fisher; ``model_stock()``). Each returns a
:class:`Soup`: its ingredients (with resolved revisions), exactly one merge method, the record of
how it was chosen and every score measured on the way. It saves itself through the streaming
merge.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hf_soups import citations
from hf_soups.cards import write_card
from hf_soups.distributed import main_process_only
from hf_soups.evaluation import EvalResult, Evaluator
from hf_soups.ingredients import Ingredient
from hf_soups.merge import (
    build_recipe,
    merge,
    weighted_state_dict,
)
from hf_soups.methods.base import MergeMethod, check_method_inputs
from hf_soups.models import ZeroShotTask, load_model
from hf_soups.output import atomic_output_dir
from hf_soups.pruning.soup_mask import SoupMask, soup_mask
from hf_soups.recipe.schema import Recipe, SoupRecord, score_table

if TYPE_CHECKING:
    from hf_soups.diagnostics import DiagnosticsReport

logger = logging.getLogger(__name__)

SOUPS_CITATION = citations.SOUPS
ScoreFunction = Callable[[nn.Module], float]


@dataclass
class Soup:
    """One merge of ingredients (exactly one :class:`~hf_soups.methods.MergeMethod`), with the
    record of how it was chosen and every score measured while it was made.

    Attributes:
        ingredients: the ingredients merged (only the kept ones for greedy).
        method: the merge rule: a :class:`~hf_soups.methods.WeightedAverage` for uniform,
            weighted, greedy and learned soups, per-tensor weights for learned-by-layer soups,
            or TIES, Model Stock, ... for merge-method soups.
        record: the soup recipe (uniform, greedy, learned...) and what its choice rested on.
        scores: model name -> eval set name -> ``EvalResult.to_dict()``; every score measured
            by the builder so far (ingredients, other soups, the ensemble).
        base: the pre-trained model the method works from, if it needs one.
    """

    ingredients: list[Ingredient]
    method: MergeMethod
    record: SoupRecord
    scores: dict[str, dict[str, dict]] = field(default_factory=dict)
    base: Ingredient | None = None
    diagnostics: DiagnosticsReport | None = field(default=None, repr=False)
    task: ZeroShotTask | None = None
    """Class names and templates that score CLIP ingredients without a head."""
    tensor_weights: dict[str, list[float]] | None = field(default=None, repr=False)
    """Learned-by-layer soups: the fitted weights keyed by in-memory parameter names."""
    mask_rule: str = "shared"
    """Pruned ingredients: ``"shared"`` keeps their common mask (differing masks are an error),
    ``"intersection"`` masks the soup by the weights all of them keep."""
    mask: SoupMask | None = field(default=None, init=False, repr=False)
    """The soup's mask, found from the ingredients' ``pruning_mask.safetensors``."""

    def __post_init__(self) -> None:
        check_method_inputs(self.method, len(self.ingredients), self.base is not None)
        self.mask = soup_mask(self.ingredients, self.mask_rule)
        if self.mask is not None:
            self.record.pruning = self.mask.to_record()

    @property
    def name(self) -> str:
        return self.record.display_name

    @property
    def weights(self) -> list[float]:
        """One mixing weight per ingredient (empty for merge methods that have none)."""
        return list(self.record.weights or [])

    def recipe(self, **fields) -> Recipe:
        """The :class:`~hf_soups.recipe.Recipe` written as ``soup.json``."""
        if self.diagnostics is not None:
            from hf_soups.diagnostics.plots import plot_names

            fields.setdefault("diagnostics", self.diagnostics.to_dict())
            fields.setdefault("plots", plot_names(self.diagnostics))
        return build_recipe(
            self.ingredients,
            self.method,
            self.base,
            fields.pop("dtype", None),
            soup=self.record,
            scores=score_table(self.scores),
            task=self.task.to_dict() if self.task is not None else None,
            **fields,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The soup's weights in memory, keyed as on disk."""
        return weighted_state_dict(
            self.ingredients, method=self.method, base=self.base, mask=self.mask
        )

    def to_model(self) -> nn.Module:
        """The soup as an in-memory model, in eval mode."""
        return load_model(self.ingredients[0], self.state_dict(), task=self.task)

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

    @main_process_only
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

        Under ``accelerate launch`` the main process writes it; the others wait and return the
        same path (:func:`hf_soups.distributed.on_main_process`)."""
        sources = [*self.ingredients, *([self.base] if self.base else [])]
        with atomic_output_dir(
            out_dir, overwrite=overwrite, inputs=[i.path for i in sources]
        ) as work_dir:
            merge(
                self.ingredients,
                work_dir,
                method=self.method,
                base=self.base,
                dtype=dtype,
                max_shard_size=max_shard_size,
                recipe=self.recipe(dtype=dtype),
                progress=progress,
                mask=self.mask,
            )
            if self.diagnostics is not None:
                from hf_soups.diagnostics import write_plots

                write_plots(self.diagnostics, work_dir)
                write_card(work_dir)  # again, now that the plots it links exist
        return Path(out_dir)

    @main_process_only
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
        """Save the soup with its model card and upload it to the Hub in one commit (made by
        the main process alone under ``accelerate launch``)."""
        import tempfile

        from hf_soups.hub import check_push_access, push_folder

        # An unreachable Hub or a refused token is found before the merge, not after it.
        check_push_access(repo_id, private=private, token=token, revision=revision)
        with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
            folder = self.save_pretrained(Path(scratch) / "soup", progress=False)
            write_card(folder, model_name=repo_id.split("/")[-1], repo_id=repo_id)
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


def __getattr__(name: str):
    # SoupBuilder lives in hf_soups.builder (it imports this module); kept importable from here.
    if name == "SoupBuilder":
        from hf_soups.builder import SoupBuilder

        return SoupBuilder
    raise AttributeError(f"module 'hf_soups.soup' has no attribute {name!r}")
