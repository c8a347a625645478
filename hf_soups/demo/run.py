"""The offline demo end to end: pre-train, fine-tune a sweep, cook soups, score everything.

Every model is a plain transformers ``CLIPModel`` folder scored with one zero-shot task (its own
text tower, one prompt template), so ``pipeline("zero-shot-image-classification")`` reproduces
the reported predictions. Every choice is made on data the reported sets do not resemble more
than the training data does (see :data:`PROTOCOL`): greedy and learned soups and the "best
individual" on the clean validation split, WiSE-FT's coefficient on the clean validation split
and a corruption family never reported (translation). The test split and its shifted copies are
only reported, and the paired comparisons are judged with Holm's correction over all of them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from hf_soups.cards import write_card
from hf_soups.demo.data import load_demo_data
from hf_soups.demo.finetune import finetune_sweep
from hf_soups.demo.multitask import MultiTaskResults, run_multitask
from hf_soups.demo.pretrain import pretrain_zero_shot
from hf_soups.evaluation import EvalResult, Evaluator
from hf_soups.ingredients import Ingredient
from hf_soups.models import ZeroShotTask, load_model
from hf_soups.output import atomic_output_dir
from hf_soups.patching import DEFAULT_ALPHAS, TaskSpec, choose_wise_ft
from hf_soups.report import comparisons_table, results_table
from hf_soups.soup import Soup, SoupBuilder
from hf_soups.stats import adjust_comparisons, paired_comparison
from hf_soups.threads import one_thread

logger = logging.getLogger(__name__)

ID_SET = "test"
FAST_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
MULTITASK_JSON = "multitask_results.json"
MULTITASK_MD = "multitask_results.md"

PROTOCOL = """\
How every choice was made (the reported sets never influence one):
- **Zero-shot model**: the pre-trained CLIP with the head its own text tower builds from the one
  template "a photo of the digit {}" (pre-training captioned images with four templates).
- **Ingredients**: image tower and visual projection fine-tuned against that fixed head (text
  tower and logit scale frozen); hyperparameters drawn with a fixed seed.
- **Best individual, greedy soup, learned soup**: chosen on the clean validation split (1,000
  MNIST images disjoint from the test split).
- **WiSE-FT alpha**: the alpha maximising the mean of the clean validation accuracy and the
  accuracy on the validation split translated by 5 pixels, a corruption family that is never
  reported; no reported shift (rotate, noise, invert, downscale) is used.
- **Reported**: the test split and its four shifted copies, each scored once per model.
- **Comparisons**: exact McNemar tests against the best individual, paired on the same images;
  p-values Holm-adjusted over every comparison in the table together (raw p beside it), a star
  when the adjusted p < 0.05.
"""

MULTITASK_PROTOCOL = """\
Multi-task run (fusion_bench style): the pre-trained CLIP's vision tower fine-tuned separately on
three tasks, each saved as a `CLIPVisionModel` folder, each task scored with the head the
pre-trained text tower builds from its class names and template (mnist and digits: "a photo of
the digit {}", ten digits; parity: "a photo of an {} digit", even / odd, words pre-training never
saw, so the pre-trained model is near chance there). Merges use the pre-trained vision tower as
base; task arithmetic's and TIES's lambda (TIES density 0.2) are chosen on the mean accuracy over
the three validation splits; the uniform soup has no parameter. Cells: test accuracy in percent
with its 95% Wilson interval; average: the unweighted mean over tasks.
"""


@dataclass
class DemoResults:
    """What the demo measured: per model, per eval set, an :class:`EvalResult`."""

    results: dict[str, dict[str, EvalResult]]
    cost: dict[str, int]
    comparisons: list[dict]
    wise_ft_alpha: float
    seconds: dict[str, float]
    diagnostics: dict
    multitask: MultiTaskResults | None = None
    cpu_seconds: dict[str, float] | None = None
    wise_ft_selection: dict | None = None

    def table(self) -> str:
        """The results table: accuracy in percent with its 95% interval."""
        return results_table(_summaries(self.results), cost=self.cost)

    def comparisons_table(self) -> str:
        """Each soup, the ensemble and WiSE-FT against the best individual model, paired on the
        same examples: difference in points, raw and Holm-adjusted McNemar p-values, ``*`` when
        the adjusted p is below 0.05."""
        return comparisons_table(self.comparisons, baseline="best individual")

    def to_dict(self) -> dict:
        return {
            "results": _summaries(self.results),
            "inference_cost": self.cost,
            "comparisons": self.comparisons,
            "wise_ft_alpha": self.wise_ft_alpha,
            "wise_ft_selection": self.wise_ft_selection,
            "diagnostics": self.diagnostics,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
        }

    def markdown(self) -> str:
        """results.md: the two tables with the protocol beside them."""
        return f"{PROTOCOL}\n{self.table()}\n\n{self.comparisons_table()}\n"


def run_demo(
    out_dir: str | os.PathLike = "demo_output",
    *,
    fast: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    multitask: bool = True,
) -> DemoResults:
    """Run the whole demo into ``out_dir`` (written atomically) and return its results.

    ``out_dir`` ends up holding ``zero_shot/``, ``ingredients/``, ``greedy_soup/`` (with its
    model card), ``wise_ft/`` (the greedy soup interpolated with the zero-shot model, card and
    plot), ``results.json``, ``results.md``, ``predictions/`` (per-example predictions),
    ``multitask/`` (the multi-task run's ``CLIPVisionModel`` folders) and
    ``multitask_results.json`` / ``.md``. Every model folder is a plain ``CLIPModel`` (or
    ``CLIPVisionModel``) with its tokenizer and image processor.
    """
    size = "fast" if fast else "default"
    # Wall time and this process's CPU time per stage: on a shared machine the CPU time is
    # what the demo costs, the wall time what it took.
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    clock, cpu_clock = time.perf_counter(), time.process_time()

    def lap(stage: str) -> None:
        nonlocal clock, cpu_clock
        now, cpu_now = time.perf_counter(), time.process_time()
        seconds[stage] = round(now - clock, 1)
        cpu_seconds[stage] = round(cpu_now - cpu_clock, 1)
        clock, cpu_clock = now, cpu_now

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

        # One template: what pipeline("zero-shot-image-classification") fills.
        task = ZeroShotTask(data.classnames, templates=data.templates, name="mnist")
        score("zero-shot", load_model(zero_shot, task=task))

        # Built in a temporary folder renamed at the end: record where each model will be.
        def final(folder: Path) -> Ingredient:
            return Ingredient.from_folder(folder, source=str(out / folder.relative_to(work)))

        builder = SoupBuilder([final(folder) for folder in folders], task=task)
        diagnostics = builder.check(held_out, points=3, progress=False)
        lap("diagnostics")
        greedy = builder.greedy(held_out)
        for ingredient in builder.ingredients:
            score(ingredient.name, load_model(ingredient, task=task))
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
        models = [load_model(ingredient, task=task) for ingredient in builder.ingredients]
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
            in_distribution={"validation": TaskSpec(held_out, task=task)},
            # A corruption family that is never reported: choosing on the reported shifts
            # (even on other draws of them) would be selection on the results.
            shifted={
                f"validation ({name})": TaskSpec(evaluator(dataset, name), task=task)
                for name, dataset in data.selection.items()
            },
            alphas=FAST_ALPHAS if fast else DEFAULT_ALPHAS,
            progress=progress,
        )
        wise_name = f"WiSE-FT (greedy soup, alpha={wise.alpha:g})"
        wise.save_pretrained(work / "wise_ft", progress=False)
        score(wise_name, load_model(work / "wise_ft", task=task))
        lap("WiSE-FT sweep")
        multitask_results = None
        if multitask:
            multitask_results = run_multitask(
                zero_shot,
                data,
                work / "multitask",
                size,
                seed,
                accelerator=accelerator,
                progress=progress,
            )
            (work / MULTITASK_JSON).write_text(
                json.dumps(multitask_results.to_dict(), indent=2) + "\n"
            )
            (work / MULTITASK_MD).write_text(f"{MULTITASK_PROTOCOL}\n{multitask_results.table()}\n")
            lap("multi-task run")

        cost = {name: 1 for name in results} | {"ensemble": len(builder.ingredients)}
        pairs = [
            (model, key)
            for model in ["uniform soup", "greedy soup", "learned soup", "ensemble", wise_name]
            for key in report_sets
        ]
        # Reported together, so judged together: Holm over every comparison of the table.
        adjusted = adjust_comparisons(
            [paired_comparison(results[m][k], results["best individual"][k]) for m, k in pairs]
        )
        comparisons = [
            {"eval_set": key, **comparison.to_dict()}
            for (_, key), comparison in zip(pairs, adjusted, strict=True)
        ]
        demo = DemoResults(
            results,
            cost,
            comparisons,
            wise.alpha,
            seconds,
            diagnostics.to_dict(),
            multitask_results,
            cpu_seconds,
            wise.to_dict()["selection"],
        )
        write_card(work / "wise_ft", model_name="hf-soups demo WiSE-FT")
        for model, per_set in results.items():
            for key, result in per_set.items():
                result.save(work / "predictions" / f"{_slug(model)}__{key}.json")
        (work / "results.json").write_text(json.dumps(demo.to_dict(), indent=2) + "\n")
        (work / "results.md").write_text(demo.markdown())
        lap("writing")
    return demo


def _summaries(results: dict[str, dict[str, EvalResult]]) -> dict[str, dict[str, dict]]:
    return {
        model: {name: result.to_dict() for name, result in per_set.items()}
        for model, per_set in results.items()
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()
