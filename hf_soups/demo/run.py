"""The offline demo end to end: pre-train, fine-tune a sweep, cook soups, score everything.

Everything is chosen on the validation split (greedy and learned soups, the WiSE-FT
coefficient, the "best individual") and reported on the test split and its shifted copies,
which no choice ever saw.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
from accelerate import Accelerator

from hf_soups.cards import write_card
from hf_soups.demo.data import SHIFTS, DemoData, load_demo_data, to_dataset
from hf_soups.demo.finetune import finetune_sweep
from hf_soups.demo.pretrain import one_thread, pretrain_zero_shot
from hf_soups.evaluation import EvalResult, Evaluator
from hf_soups.ingredients import Ingredient
from hf_soups.models import load_model
from hf_soups.output import atomic_output_dir
from hf_soups.patching import DEFAULT_ALPHAS, choose_wise_ft
from hf_soups.report import comparisons_table, results_table
from hf_soups.soup import Soup, SoupBuilder
from hf_soups.stats import paired_comparison

logger = logging.getLogger(__name__)

ID_SET = "test"
FAST_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class DemoResults:
    """What the demo measured: per model, per eval set, an :class:`EvalResult`."""

    results: dict[str, dict[str, EvalResult]]
    cost: dict[str, int]
    comparisons: list[dict]
    wise_ft_alpha: float
    seconds: dict[str, float]
    diagnostics: dict

    def table(self) -> str:
        """The results table: accuracy in percent with its 95% interval."""
        return results_table(_summaries(self.results), cost=self.cost)

    def comparisons_table(self) -> str:
        """Each soup, the ensemble and WiSE-FT against the best individual model, paired on the
        same examples: difference in points, McNemar p-value, ``*`` beyond noise."""
        return comparisons_table(self.comparisons, baseline="best individual")

    def to_dict(self) -> dict:
        return {
            "results": _summaries(self.results),
            "inference_cost": self.cost,
            "comparisons": self.comparisons,
            "wise_ft_alpha": self.wise_ft_alpha,
            "diagnostics": self.diagnostics,
            "seconds": self.seconds,
        }


def shifted_validation(data: DemoData) -> dict[str, datasets.Dataset]:
    """The validation split under the same corruptions as the shifted test sets (other draws),
    so the WiSE-FT coefficient can be chosen without looking at the test shifts."""
    split = data.validation[:]
    images, labels = split["pixel_values"], split["labels"]
    return {
        f"validation_{name}": to_dataset(shift(images, data.seed + 100 + k), labels)
        for k, (name, shift) in enumerate(SHIFTS.items(), start=1)
    }


def run_demo(
    out_dir: str | os.PathLike = "demo_output",
    *,
    fast: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> DemoResults:
    """Run the whole demo into ``out_dir`` (written atomically) and return its results.

    ``out_dir`` ends up holding ``zero_shot/``, ``ingredients/``, ``greedy_soup/`` (with its
    model card), ``wise_ft/`` (the greedy soup interpolated with the zero-shot model, card and
    plot), ``results.json``, ``results.md`` and ``predictions/`` (per-example predictions).
    """
    size = "fast" if fast else "default"
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 1)
        clock = now

    accelerator = Accelerator(cpu=True)
    out = Path(out_dir)
    with one_thread(), atomic_output_dir(out, overwrite=overwrite) as work:
        data = load_demo_data(seed)
        zero_shot = pretrain_zero_shot(work / "zero_shot", data, size, seed, progress=progress)
        lap("pre-training")
        folders = finetune_sweep(
            zero_shot, data, work / "ingredients", size, seed, progress=progress
        )
        lap("fine-tuning")

        def evaluator(dataset, name):
            return Evaluator(dataset, name=name, accelerator=accelerator, progress=False)

        held_out = evaluator(data.validation, "validation")
        report_sets = {ID_SET: evaluator(data.test, ID_SET)} | {
            name: evaluator(dataset, name) for name, dataset in data.shifted.items()
        }
        results: dict[str, dict[str, EvalResult]] = {}

        def score(name: str, model) -> None:
            results[name] = {key: ev.evaluate(model, name=name) for key, ev in report_sets.items()}

        score("zero-shot", load_model(zero_shot))

        # Built in a temporary folder renamed at the end: record where each model will be.
        def final(folder: Path) -> Ingredient:
            return Ingredient.from_folder(folder, source=str(out / folder.relative_to(work)))

        builder = SoupBuilder([final(folder) for folder in folders])
        diagnostics = builder.check(held_out, points=3, progress=False)
        lap("diagnostics")
        greedy = builder.greedy(held_out)
        for ingredient in builder.ingredients:
            score(ingredient.name, load_model(ingredient))
        results["best individual"] = results[builder.best_individual]
        soups: dict[str, Soup] = {
            "uniform soup": builder.uniform(),
            "greedy soup": greedy,
            "learned soup": builder.learned(
                data.validation, epochs=3 if fast else 5, batch_size=128, progress=progress
            ),
        }
        for name, soup in soups.items():
            score(name, soup.to_model())
        models = [load_model(ingredient) for ingredient in builder.ingredients]
        results["ensemble"] = {
            key: ev.evaluate_ensemble(models, name="ensemble") for key, ev in report_sets.items()
        }
        del models
        lap("soups and ensemble")

        greedy.scores = _summaries(results)
        greedy_dir = greedy.save_pretrained(work / "greedy_soup", progress=False)
        write_card(greedy_dir, model_name="hf-soups demo greedy soup")
        wise = choose_wise_ft(
            final(zero_shot),
            final(greedy_dir),
            in_distribution={"validation": held_out},
            shifted={
                name: evaluator(dataset, name) for name, dataset in shifted_validation(data).items()
            },
            alphas=FAST_ALPHAS if fast else DEFAULT_ALPHAS,
            progress=progress,
        )
        wise_name = f"WiSE-FT (greedy soup, alpha={wise.alpha:g})"
        score(wise_name, wise.to_model())
        lap("WiSE-FT sweep")

        cost = {name: 1 for name in results} | {"ensemble": len(builder.ingredients)}
        comparisons = [
            {
                "eval_set": key,
                **paired_comparison(results[model][key], results["best individual"][key]).to_dict(),
            }
            for model in ["uniform soup", "greedy soup", "learned soup", "ensemble", wise_name]
            for key in report_sets
        ]
        demo = DemoResults(results, cost, comparisons, wise.alpha, seconds, diagnostics.to_dict())
        wise.save_pretrained(work / "wise_ft", progress=False)
        write_card(work / "wise_ft", model_name="hf-soups demo WiSE-FT")
        for model, per_set in results.items():
            for key, result in per_set.items():
                result.save(work / "predictions" / f"{_slug(model)}__{key}.json")
        (work / "results.json").write_text(json.dumps(demo.to_dict(), indent=2) + "\n")
        (work / "results.md").write_text(demo.table() + "\n\n" + demo.comparisons_table() + "\n")
        lap("writing")
    return demo


def _summaries(results: dict[str, dict[str, EvalResult]]) -> dict[str, dict[str, dict]]:
    return {
        model: {name: result.to_dict() for name, result in per_set.items()}
        for model, per_set in results.items()
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()
