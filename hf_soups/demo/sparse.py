"""The demo's sparse stage: Sparse Model Soups on the tiny CLIP and the real MNIST digits.

The demo's pre-trained CLIP is fine-tuned once (image tower and visual projection, against the
fixed zero-shot head its frozen text tower builds, as in :mod:`hf_soups.demo.finetune`): the
**dense** model. Then, every copy retrained the same way (same epochs and learning rate, seeds
differing):

- **dense soup**: ``copies`` retrained copies of the dense model, averaged;
- **IMP**: :func:`hf_soups.pruning.sparse_soup_rounds` with one copy per round: magnitude
  pruning of the image side, per layer, to 50%, 80% and 90% sparsity, retraining after each
  prune;
- **sparse soup**: the same rounds with ``copies`` copies per round sharing the round's mask,
  their soup (uniform, or greedy on the validation split) starting the next round (Zimmer,
  Spiegel & Pokutta, ICLR 2024);
- **reduced**: the dense model with narrower image MLPs, by structured reduction to a stated
  parameter and FLOP reduction (:mod:`hf_soups.demo.sparse_reduction`), saved as a plain
  ``CLIPModel`` folder with its card.

Greedy soups choose on the validation split; the test split and its shifted copies are only
reported, with 95% Wilson intervals. The sparse soup at the highest sparsity is saved as a plain
``CLIPModel`` folder with its ``pruning_mask.safetensors``, recipe and model card, made by
:class:`~hf_soups.SoupBuilder` from the last round's copies (saved beside it).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPProcessor, PrinterCallback, Trainer, TrainingArguments

from hf_soups.builder import SoupBuilder
from hf_soups.cards import write_card
from hf_soups.demo.data import DemoData, load_demo_data
from hf_soups.demo.finetune import FixedHeadFineTuning, clip_fine_tuning
from hf_soups.demo.pretrain import (
    PretrainConfig,
    deterministic,
    pretrain_zero_shot,
    quiet_transformers,
)
from hf_soups.demo.sparse_reduction import REDUCED_FOLDER, reduce_dense
from hf_soups.demo.sparse_results import (
    REPORTED_SET,
    SparseConfig,
    SparseResults,
    SparseRow,
    pruning_recipe,
)
from hf_soups.errors import HfSoupsError
from hf_soups.evaluation import Evaluator
from hf_soups.ingredients import Ingredient
from hf_soups.models import ZeroShotTask
from hf_soups.output import atomic_output_dir
from hf_soups.pruning import prunable_parameters, saved_names, sparse_soup_rounds, write_mask_file
from hf_soups.pruning.flops import model_counts
from hf_soups.threads import one_thread

logger = logging.getLogger(__name__)

SPARSE_FOLDER = "sparse"
SPARSE_JSON = "sparse_results.json"
SPARSE_MD = "sparse_results.md"
SPARSE_SOUP_FOLDER = "sparse_soup"
SPARSE_COPIES_FOLDER = "sparse_soup_copies"


class ImageSideFineTuning(FixedHeadFineTuning):
    """:class:`FixedHeadFineTuning` whose only registered module is the scorer (image tower,
    visual projection, fixed head): pruning, averaging and the optimiser then see exactly what
    fine-tuning changes, while ``save_pretrained`` still writes the whole ``CLIPModel``.

    The frozen text tower is never pruned: the head it rebuilds on loading must stay the head
    the copies were trained against.
    """

    def __init__(self, fine_tuning: FixedHeadFineTuning) -> None:
        nn.Module.__init__(self)
        self.scorer = fine_tuning.scorer
        # Held, not registered: deepcopy still copies it with the scorer's modules shared.
        object.__setattr__(self, "model", fine_tuning.model)


def _arguments(
    work: Path, config: SparseConfig, *, epochs: float, learning_rate: float, seed: int
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(work),
        use_cpu=True,
        num_train_epochs=epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        seed=seed,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def measured_sparsity(model: nn.Module) -> float:
    """Share of exact zeros among ``model``'s prunable weights."""
    weights = prunable_parameters(model).values()
    return zeros(model) / sum(w.numel() for w in weights)


def zeros(model: nn.Module) -> int:
    """Exact zeros among ``model``'s prunable weights."""
    return sum(int((w == 0).sum()) for w in prunable_parameters(model).values())


def _check_zero_shot(folder: Path) -> None:
    """Before any work: ``--zero-shot`` must name a demo CLIP folder (a ``CLIPModel`` config
    and its tokenizer), as the full demo writes it to ``zero_shot/``."""
    config = folder / "config.json"
    if not folder.is_dir():
        raise HfSoupsError(f"--zero-shot {folder}: no such folder")
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json"))
    if model_type != "clip" or not tokenizer:
        raise HfSoupsError(
            f"--zero-shot {folder}: not a demo CLIP folder (a CLIPModel config.json and its "
            "tokenizer, as a full demo writes to OUT/zero_shot)"
        )


def run_sparse_demo(
    out_dir: str | os.PathLike = "demo_output",
    *,
    fast: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    pretrain: str | PretrainConfig | None = None,
    pretrain_steps: int | None = None,
    config: SparseConfig | None = None,
    zero_shot: str | os.PathLike | None = None,
) -> SparseResults:
    """Run the sparse stage into ``out_dir/sparse/`` (written atomically).

    ``sparse/`` ends up holding ``zero_shot/`` (the pre-trained CLIP it starts from, unless
    one is given),
    ``sparse_soup/`` (the sparse soup at the highest sparsity: a ``CLIPModel`` folder with its
    ``pruning_mask.safetensors``, ``soup.json`` and model card), ``sparse_soup_copies/`` (the
    last round's copies it is made from), ``reduced/`` (the structurally reduced model, a plain
    ``CLIPModel`` folder with ``reduction.json`` and its card), ``sparse_results.json`` and
    ``sparse_results.md``.

    Args:
        out_dir: the demo's output folder; only its ``sparse/`` is written (refused if it
            exists, unless ``overwrite``).
        fast: the small pre-training (the demo's ``--fast`` model).
        pretrain: pre-training size (default: ``"fast"`` or ``"default"`` after ``fast``).
        progress: progress bars for pre-training and for the stage's models.
        pretrain_steps: stop pre-training after this many steps (for tests).
        config: the sparse schedule (default: :class:`SparseConfig`'s).
        zero_shot: a pre-trained demo CLIP folder to start from instead of pre-training one
            (the full demo's ``demo_output/zero_shot``; read only).
    """
    size = "fast" if fast else "default"
    config = config or SparseConfig()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 1)
        clock = now

    if zero_shot is not None:
        _check_zero_shot(Path(zero_shot))
    target = Path(out_dir) / SPARSE_FOLDER
    accelerator = Accelerator(cpu=True)
    with (
        one_thread(),
        atomic_output_dir(
            target, overwrite=overwrite, inputs=[zero_shot] if zero_shot else []
        ) as work,
        quiet_transformers(),
        tempfile.TemporaryDirectory(prefix="hf-soups-sparse-") as scratch,
    ):
        data = load_demo_data(seed)
        if zero_shot is None:
            zero_shot = pretrain_zero_shot(
                work / "zero_shot",
                data,
                pretrain or size,
                seed,
                max_steps=pretrain_steps,
                progress=progress,
            )
            lap("pre-training")
        zero_shot = Path(zero_shot)
        stage = _SparseStage(data, zero_shot, config, seed, Path(scratch), accelerator)
        rows = 3 + len(config.sparsities) * (1 + len(config.soups))
        with (
            deterministic(seed),
            tqdm(total=rows, desc="sparse stage", disable=not progress) as bar,
        ):
            stage.on_row = bar.update
            dense = stage.dense()
            lap("dense fine-tuning")
            rule = config.dense_soup
            stage.rounds(f"dense soup ({rule})", dense, [0.0], config.copies, rule)
            lap("dense soup")
            stage.rounds("IMP", dense, config.sparsities, 1, "uniform")
            lap("IMP")
            copies_dir = work / SPARSE_COPIES_FOLDER
            for rule in config.soups:
                stage.rounds(
                    f"sparse soup ({rule})",
                    dense,
                    config.sparsities,
                    config.copies,
                    rule,
                    save_copies=copies_dir if rule == config.soups[0] else None,
                )
                lap(f"sparse soup ({rule})")
            reduction = reduce_dense(stage, dense, work / REDUCED_FOLDER)
            lap("structured reduction")
        saved = stage.save_soup(copies_dir, work / SPARSE_SOUP_FOLDER, target)
        lap("saving")
        seconds["total"] = round(sum(seconds.values()), 1)
        results = SparseResults(
            stage.rows, config, seconds, saved, stage.records, reduction.to_record()
        )
        (work / SPARSE_JSON).write_text(json.dumps(results.to_dict(), indent=2) + "\n")
        (work / SPARSE_MD).write_text(results.markdown())
    return results


class _SparseStage:
    """The trainings and evaluations of one sparse stage, and the table rows they give."""

    def __init__(
        self,
        data: DemoData,
        zero_shot: Path,
        config: SparseConfig,
        seed: int,
        scratch: Path,
        accelerator: Accelerator,
    ) -> None:
        self.data, self.zero_shot, self.config, self.seed = data, zero_shot, config, seed
        self.scratch = scratch
        self.task = ZeroShotTask(data.classnames, templates=data.templates, name="mnist")
        self.processor = CLIPProcessor.from_pretrained(zero_shot)
        prompts = [t.format(c) for c in data.classnames for t in data.templates]
        # The table's FLOPs count one image and the longest class prompt, not the text
        # config's max_position_embeddings (room the prompts do not use).
        self.text_length = self.processor.tokenizer(prompts, padding=True, return_tensors="pt")[
            "input_ids"
        ].shape[1]

        def evaluator(dataset, name):
            return Evaluator(dataset, name=name, accelerator=accelerator, progress=False)

        self.validation = evaluator(data.validation, "validation")
        self.reported = {REPORTED_SET: evaluator(data.test, REPORTED_SET)} | {
            name: evaluator(dataset, name) for name, dataset in data.shifted.items()
        }
        self.rows: list[SparseRow] = []
        self.records: dict[str, list[dict]] = {}
        self.last_soup: tuple[str, list[int]] | None = None
        self.on_row: Callable[[], object] = lambda: None

    def validation_accuracy(self, model: ImageSideFineTuning) -> float:
        return self.validation.evaluate(model.scorer).score

    def arguments(self, name: str, **settings) -> TrainingArguments:
        """The stage's training arguments for one run, writing under the scratch folder."""
        return _arguments(self.scratch / name, self.config, **settings)

    def add_row(self, name: str, kind: str, target: float, copies: int, model) -> SparseRow:
        counts = model_counts(model.model, text_length=self.text_length)
        row = SparseRow(
            name=name,
            kind=kind,
            target_sparsity=target,
            sparsity=measured_sparsity(model),
            # Pruned rows count what their masks keep: the zeros are no parameters to store.
            parameters=counts["parameters"] - (zeros(model) if target > 0 else 0),
            flops=counts["flops"],
            copies=copies,
            validation=self.validation_accuracy(model),
            results={
                key: ev.evaluate(model.scorer, name=name) for key, ev in self.reported.items()
            },
        )
        self.rows.append(row)
        self.on_row()
        logger.info("%s: sparsity %.3f, test %.4f", name, row.sparsity, row.results["test"].score)
        return row

    def dense(self) -> ImageSideFineTuning:
        """The pre-trained CLIP's image side fine-tuned once: where every copy starts."""
        model = ImageSideFineTuning(
            clip_fine_tuning(self.zero_shot, self.data.classnames, self.data.templates)
        )
        args = self.arguments(
            "dense",
            epochs=self.config.dense_epochs,
            learning_rate=self.config.dense_learning_rate,
            seed=self.seed,
        )
        trainer = Trainer(model=model, args=args, train_dataset=self.data.train)
        trainer.remove_callback(PrinterCallback)  # the stage logs one line per model
        trainer.train()
        model.eval()
        self.add_row("dense (fine-tuned)", "dense", 0.0, 1, model)
        return model

    def rounds(
        self,
        kind: str,
        start: ImageSideFineTuning,
        sparsities: Sequence[float],
        copies: int,
        rule: str,
        *,
        save_copies: Path | None = None,
    ) -> None:
        """One run of the Sparse Model Soups loop from ``start``, a row per round."""
        last = len(sparsities) - 1
        names = saved_names(start, list(prunable_parameters(start))) if save_copies else None

        def save_copy(index: int, number: int, member, masks: Mapping[str, torch.Tensor]):
            if save_copies is not None and index == last:
                folder = save_copies / f"copy-{number}"
                member.save_pretrained(folder)
                self.processor.save_pretrained(folder)
                write_mask_file(member, masks, folder, names=names)

        def add(record, model) -> None:
            dense = max(sparsities) == 0.0
            name = kind if dense else f"{kind}, {sparsities[record.index]:.0%} sparse"
            self.add_row(name, kind, sparsities[record.index], copies, model)

        args = self.arguments(
            "".join(c if c.isalnum() else "_" for c in kind),
            epochs=self.config.retrain_epochs,
            learning_rate=self.config.retrain_learning_rate,
            seed=self.seed + 1,
        )
        result = sparse_soup_rounds(
            copy.deepcopy(start),
            self.data.train,
            args,
            sparsities=list(sparsities),
            copies=copies,
            soup=rule,
            score=self.validation_accuracy if rule == "greedy" else None,
            scope=self.config.scope,
            on_round=add,
            on_copy=save_copy,
        )
        self.records[kind] = [asdict(record) for record in result.rounds]
        if save_copies is not None:
            self.last_soup = (kind, result.rounds[-1].kept)

    def save_soup(self, copies_dir: Path, out: Path, final: Path) -> str:
        """Save the last sparse soup through :class:`SoupBuilder` from the copies it kept;
        its table row is re-scored on the saved weights. Returns its row name."""
        kind, kept = self.last_soup
        ingredients = [
            Ingredient.from_folder(
                copies_dir / f"copy-{i}",
                source=str(final / SPARSE_COPIES_FOLDER / f"copy-{i}"),
            )
            for i in kept
        ]
        soup = SoupBuilder(ingredients, task=self.task, masks="shared").uniform()
        row = next(r for r in reversed(self.rows) if r.kind == kind)
        soup.record.name = row.name
        soup.record.held_out = "validation" if "greedy" in kind else None
        soup.record.pruning.recipe = pruning_recipe(self.config, kind, self.records[kind])
        model = soup.to_model()
        row.results = {key: ev.evaluate(model, name=row.name) for key, ev in self.reported.items()}
        soup.scores = {
            r.name: {key: result.to_dict() for key, result in r.results.items()} for r in self.rows
        }
        soup.save_pretrained(out, progress=False)
        write_card(out, model_name=f"hf-soups demo {row.name}")
        return row.name
