"""The demo's multi-task run in the fusion_bench style: vision-only fine-tunes, merged.

One tiny pre-trained CLIP; its vision tower is fine-tuned separately on three tasks made from
the packaged data (MNIST digits, scikit-learn's digits upscaled, MNIST parity with its own class
names), each against the fixed zero-shot head that the pre-trained text tower builds from the
task's class names and template, and saved as a ``CLIPVisionModel`` folder, as fusion_bench
publishes its ``tanganke/clip-vit-base-patch32_<task>`` models. The fine-tunes are merged with
the uniform soup, task arithmetic and TIES (base: the pre-trained vision tower), and every model
is scored on every task with that task's head from the base text tower
(``ZeroShotTask(..., text_model=<pre-trained CLIPModel>)``): the per-task accuracy table
fusion_bench reports, with Wilson intervals.

Merge scalings are chosen on the tasks' validation splits (mean accuracy); the table is on their
test splits.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean

from accelerate import Accelerator
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import CLIPVisionModel

from hf_soups.demo.data import (
    CLASSNAMES,
    PARITY_CLASSNAMES,
    PARITY_TEMPLATE,
    TEMPLATE,
    DemoData,
    image_processor,
    to_dataset,
)
from hf_soups.demo.finetune import (
    FixedHeadFineTuning,
    IngredientSpec,
    SweepConfig,
    fixed_head_trainer,
)
from hf_soups.demo.pretrain import deterministic, quiet_transformers
from hf_soups.evaluation import EvalResult, Evaluator
from hf_soups.ingredients import Ingredient
from hf_soups.models import ZeroShotTask, load_model
from hf_soups.output import atomic_output_dir
from hf_soups.soup import Soup, SoupBuilder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoTask:
    """One task of the multi-task run: its splits, class names and the one scoring template."""

    name: str
    classnames: tuple[str, ...]
    template: str
    train: Dataset
    validation: Dataset
    test: Dataset

    def zero_shot_task(self, text_model: Path) -> ZeroShotTask:
        """The task's head, built by ``text_model``'s text tower."""
        return ZeroShotTask(
            self.classnames, templates=(self.template,), text_model=str(text_model), name=self.name
        )


def _parity(dataset: Dataset) -> Dataset:
    columns = dataset.with_format("torch")[:]
    return to_dataset(columns["pixel_values"], columns["labels"] % 2, PARITY_CLASSNAMES)


def demo_tasks(data: DemoData) -> list[DemoTask]:
    """The three tasks: MNIST digits, scikit-learn digits, MNIST parity (even / odd)."""
    digits = data.digits
    return [
        DemoTask("mnist", CLASSNAMES, TEMPLATE, data.train, data.validation, data.test),
        DemoTask(
            "digits", CLASSNAMES, TEMPLATE, digits["train"], digits["validation"], digits["test"]
        ),
        DemoTask(
            "parity",
            PARITY_CLASSNAMES,
            PARITY_TEMPLATE,
            _parity(data.train),
            _parity(data.validation),
            _parity(data.test),
        ),
    ]


@dataclass(frozen=True)
class MultiTaskConfig:
    """Fine-tuning schedule of the per-task runs and the merge parameters searched."""

    epochs: int
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    batch_size: int = 64
    # Task arithmetic's and TIES's lambda, chosen on the mean validation accuracy.
    scalings: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    # TIES keeps the top 20% of each task vector (the paper's and fusion_bench's k).
    density: float = 0.2


MULTITASK_SIZES: dict[str, MultiTaskConfig] = {
    "fast": MultiTaskConfig(epochs=1),
    "default": MultiTaskConfig(epochs=2),
}


@dataclass
class MultiTaskResults:
    """Per model (row), per task (column): the test :class:`EvalResult`; plus the choices."""

    tasks: list[str]
    results: dict[str, dict[str, EvalResult]]
    choices: dict[str, dict]

    def average(self, model: str) -> float:
        return fmean(self.results[model][task].score for task in self.tasks)

    def table(self) -> str:
        """Accuracy in percent with its 95% Wilson interval, per task, and the average."""
        header = ["method", *self.tasks, "average"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model, per_task in self.results.items():
            cells = []
            for task in self.tasks:
                result = per_task[task]
                low, high = result.intervals["accuracy"]
                cells.append(f"{100 * result.score:.1f} ({100 * low:.1f}-{100 * high:.1f})")
            lines.append(
                "| " + " | ".join([model, *cells, f"{100 * self.average(model):.1f}"]) + " |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "tasks": self.tasks,
            "results": {
                model: {task: result.to_dict() for task, result in per_task.items()}
                for model, per_task in self.results.items()
            },
            "average": {model: self.average(model) for model in self.results},
            "choices": self.choices,
        }


def _finetune_task(
    base_dir: Path,
    text_model: Path,
    task: DemoTask,
    config: MultiTaskConfig,
    out_dir: Path,
    seed: int,
    work_dir: Path,
) -> Path:
    """Fine-tune the base vision tower on ``task``; write it as a ``CLIPVisionModel`` folder."""
    spec = IngredientSpec(
        name=task.name,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        augment=True,
        label_smoothing=0.0,
        seed=seed,
    )
    with deterministic(seed):
        # The scorer holds the CLIPVisionModel, the base's visual projection and the head from
        # the base text tower; only the vision tower trains, as in fusion_bench.
        scorer = load_model(base_dir, task=task.zero_shot_task(text_model))
        scorer.visual_projection.requires_grad_(False)
        model = FixedHeadFineTuning(scorer.vision_model, scorer)
        trainer = fixed_head_trainer(
            model,
            task.train,
            task.validation,
            spec,
            SweepConfig(num_ingredients=1, epochs=config.epochs, batch_size=config.batch_size),
            work_dir=work_dir,
        )
        trainer.train()
    with atomic_output_dir(out_dir) as tmp:
        scorer.vision_model.save_pretrained(tmp)
        image_processor().save_pretrained(tmp)
    return out_dir


def run_multitask(
    zero_shot_dir: Path,
    data: DemoData,
    out_dir: Path,
    size: str = "fast",
    seed: int = 0,
    *,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> MultiTaskResults:
    """Fine-tune, merge and score the multi-task run; the models go to ``out_dir``
    (``pretrained_vision/`` and ``finetuned/<task>/``, ``CLIPVisionModel`` folders)."""
    config = MULTITASK_SIZES[size]
    tasks = demo_tasks(data)
    base_dir = out_dir / "pretrained_vision"
    with quiet_transformers():
        with atomic_output_dir(base_dir) as tmp:
            # Loading a CLIPVisionModel from a CLIPModel folder keeps its vision_model.* tensors.
            CLIPVisionModel.from_pretrained(zero_shot_dir, use_safetensors=True).save_pretrained(
                tmp
            )
            image_processor().save_pretrained(tmp)
        folders = []
        with tempfile.TemporaryDirectory(prefix="hf-soups-trainer-") as work_dir:
            for i, task in enumerate(
                tqdm(tasks, desc="multi-task fine-tuning", disable=not progress)
            ):
                folders.append(
                    _finetune_task(
                        base_dir,
                        zero_shot_dir,
                        task,
                        config,
                        out_dir / "finetuned" / task.name,
                        seed * 1000 + 500 + i,
                        Path(work_dir),
                    )
                )
    zero_shot_tasks = {task.name: task.zero_shot_task(zero_shot_dir) for task in tasks}

    def evaluators(split: str) -> dict[str, Evaluator]:
        return {
            task.name: Evaluator(
                getattr(task, split), name=task.name, accelerator=accelerator, progress=False
            )
            for task in tasks
        }

    validation, test = evaluators("validation"), evaluators("test")

    def scores(source, state_dict, sets: dict[str, Evaluator]) -> dict[str, EvalResult]:
        return {
            name: evaluator.evaluate(
                load_model(source, state_dict, task=zero_shot_tasks[name]), name=name
            )
            for name, evaluator in sets.items()
        }

    base = Ingredient.from_folder(base_dir)
    ingredients = [Ingredient.from_folder(folder) for folder in folders]
    builder = SoupBuilder(ingredients)
    results = {"pre-trained": scores(base, None, test)}
    for task, ingredient in zip(tasks, ingredients, strict=True):
        results[f"fine-tuned on {task.name}"] = scores(ingredient, None, test)
    results["uniform soup"] = scores(ingredients[0], builder.uniform().state_dict(), test)

    choices: dict[str, dict] = {}
    merges = {
        "task arithmetic": lambda scaling: builder.merge_method(
            "task_arithmetic", base=base, scaling=scaling
        ),
        "TIES": lambda scaling: builder.merge_method(
            "ties", base=base, scaling=scaling, density=config.density
        ),
    }
    for method, make in merges.items():
        # lambda is chosen on the tasks' validation splits, never on the reported test splits.
        candidates: dict[float, Soup] = {scaling: make(scaling) for scaling in config.scalings}
        validation_mean = {
            scaling: fmean(
                r.score for r in scores(ingredients[0], soup.state_dict(), validation).values()
            )
            for scaling, soup in candidates.items()
        }
        chosen = max(config.scalings, key=lambda s: (validation_mean[s], -s))
        choices[method] = {
            "lambda": chosen,
            "validation_mean_accuracy": {str(s): v for s, v in validation_mean.items()},
        }
        if method == "TIES":
            choices[method]["density"] = config.density
        label = f"{method} (lambda={chosen:g})"
        results[label] = scores(ingredients[0], candidates[chosen].state_dict(), test)
    choices["fine-tuning"] = asdict(config)
    return MultiTaskResults([task.name for task in tasks], results, choices)
