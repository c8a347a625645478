"""Structured MLP reduction of the demo's tiny CLIP on its real MNIST images.

The demo's pipeline makes the dense model: contrastive pre-training of the ``fast`` CLIP
(:func:`hf_soups.demo.pretrain.pretrain_zero_shot`) and one fine-tuning run of its image side
against the fixed zero-shot head (:func:`hf_soups.demo.finetune.finetune_one`). Then
:func:`hf_soups.pruning.reduction.reduce_and_retrain` narrows the MLPs of both towers in steps
(first-order Taylor scores on a few training batches, cuts where the least importance is lost per
FLOP saved), retraining briefly after each step with the demo's fine-tuning ``Trainer``
(:func:`hf_soups.demo.finetune.fixed_head_trainer`), until the stated parameter and FLOP
reductions. The loss of scoring and retraining is the zero-shot classifier's cross-entropy with
the head recomputed from the text tower at every step (CLIP's ``logits_per_image`` over the class
prompts), so the text tower's neurons are scored and retrained too.

A control row retrains the dense model for as many steps as all reduction steps together, so the
comparison is not of more training against less. Accuracy: 95% Wilson intervals, n = 1,000 per
set (one run, one seed: test-set noise only). The reduced folder is reloaded with plain
``CLIPModel.from_pretrained`` and scored again. Writes ``benchmarks/results/reduction.md``.

    python benchmarks/bench_reduction.py            # a few minutes on one core
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPModel, CLIPProcessor
from transformers.modeling_outputs import ImageClassifierOutput

from hf_soups.demo.data import DemoData, load_demo_data
from hf_soups.demo.finetune import (
    IngredientSpec,
    SweepConfig,
    finetune_one,
    fixed_head_trainer,
)
from hf_soups.demo.pretrain import accuracy, deterministic, pretrain_zero_shot, quiet_transformers
from hf_soups.models.clip import clip_zero_shot_head
from hf_soups.models.scoring import ZeroShotScorer
from hf_soups.pruning import model_counts
from hf_soups.pruning.reduction import REDUCTION_FILE, reduce_and_retrain, save_reduced
from hf_soups.stats import wilson_interval


class PromptClassifier(nn.Module):
    """A CLIPModel scored over the class prompts, its head recomputed from its own text tower
    at every forward (so the text tower trains and its neurons have gradients)."""

    def __init__(self, clip: CLIPModel, prompts: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.clip = clip
        self.prompts = prompts

    @property
    def config(self):
        return self.clip.config

    def forward(self, pixel_values, labels=None) -> ImageClassifierOutput:
        logits = self.clip(**self.prompts, pixel_values=pixel_values).logits_per_image
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


def prompt_loss(prompts):
    def loss_fn(model: CLIPModel, batch) -> torch.Tensor:
        return PromptClassifier(model, prompts)(**batch).loss

    return loss_fn


def scores(model: CLIPModel, tokenizer, data: DemoData) -> dict[str, tuple[float, float, float]]:
    """Accuracy and Wilson interval on test and the shifted sets, scored as the demo scores."""
    head = clip_zero_shot_head(model, tokenizer, data.classnames, data.templates, progress=False)
    scorer = ZeroShotScorer(model.vision_model, model.visual_projection, head, data.classnames)
    result = {}
    for name, dataset in {"test": data.test, **data.shifted}.items():
        n = len(dataset)
        k = round(accuracy(scorer, dataset) * n)
        result[name] = (k / n, *wilson_interval(k, n))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-parameters", type=float, default=0.35)
    parser.add_argument("--target-flops", type=float, default=0.35)
    parser.add_argument("--step-flops", type=float, default=0.05)
    parser.add_argument("--retrain-steps", type=int, default=40)
    parser.add_argument("--retrain-lr", type=float, default=3e-4)
    parser.add_argument("--score-batches", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/reduction.md")
    options = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    data = load_demo_data(seed=0)
    rows = []

    with tempfile.TemporaryDirectory() as scratch, quiet_transformers():
        scratch = Path(scratch)
        zero_shot = pretrain_zero_shot(scratch / "zero-shot", data, "fast", seed=0, progress=False)
        dense_spec = IngredientSpec("dense", 3e-4, 0.01, True, 0.0, seed=0)
        sweep = SweepConfig(num_ingredients=1, epochs=2)
        dense_dir = finetune_one(
            zero_shot, data, dense_spec, sweep, scratch / "sweep", work_dir=scratch / "work"
        )
        tokenizer = AutoTokenizer.from_pretrained(dense_dir)
        prompts = dict(
            tokenizer(
                [data.templates[0].format(c) for c in data.classnames],
                padding=True,
                return_tensors="pt",
            )
        )
        text_length = prompts["input_ids"].shape[1]
        dense = CLIPModel.from_pretrained(dense_dir).eval()
        dense.logit_scale.requires_grad_(False)  # the temperature stays as pre-trained

        def row(name: str, model: CLIPModel) -> None:
            counts = model_counts(model, text_length=text_length)
            widths = (
                model.config.vision_config.intermediate_size,
                model.config.text_config.intermediate_size,
            )
            rows.append(
                (
                    name,
                    counts["parameters"],
                    counts["flops"],
                    widths,
                    scores(model, tokenizer, data),
                )
            )
            print(
                f"{name:34s} params {counts['parameters']} FLOPs {counts['flops']} "
                f"test {rows[-1][4]['test'][0]:.3f}",
                flush=True,
            )

        row("dense (fine-tuned)", dense)

        def retrain(model: CLIPModel, step: int) -> None:
            spec = IngredientSpec(
                f"step-{step}", options.retrain_lr, 0.01, True, 0.0, seed=100 + step
            )
            with deterministic(spec.seed):
                fixed_head_trainer(
                    PromptClassifier(model, prompts),
                    data.train,
                    data.validation,
                    spec,
                    SweepConfig(num_ingredients=1, epochs=1),
                    work_dir=scratch / "retrain",
                    max_steps=options.retrain_steps,
                ).train()
            model.eval()

        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(data.train), generator=generator)
        batches = [data.train[order[i * 64 : (i + 1) * 64]] for i in range(options.score_batches)]
        batches = [{"pixel_values": b["pixel_values"], "labels": b["labels"]} for b in batches]
        result = reduce_and_retrain(
            dense,
            batches,
            retrain=retrain,
            target_parameters=options.target_parameters,
            target_flops=options.target_flops,
            step_flops=options.step_flops,
            loss_fn=prompt_loss(prompts),
            text_length=text_length,
            on_step=lambda step, model: row(f"reduced, step {len(rows)}", model),
        )
        # The control: the dense model retrained as long as the reduction retrained in all.
        control = CLIPModel.from_pretrained(dense_dir).eval()
        control.logit_scale.requires_grad_(False)
        for step in range(len(result.steps)):
            retrain(control, step)
        row(f"dense, retrained {len(result.steps)} x {options.retrain_steps} steps", control)

        folder = save_reduced(
            result, scratch / "reduced", processing_class=CLIPProcessor.from_pretrained(dense_dir)
        )
        loaded = CLIPModel.from_pretrained(folder)
        assert (folder / REDUCTION_FILE).exists()
        assert sum(p.numel() for p in loaded.parameters()) == result.after["parameters"]
        row("reduced, reloaded by from_pretrained", loaded)
    write_table(Path(options.out), rows, options, result, time.perf_counter() - start, text_length)


def write_table(path: Path, rows, options, result, seconds: float, text_length: int) -> None:
    set_names = list(rows[0][4])
    final_scores = rows[-1][4]

    def placement(reference) -> str:
        """Where the reduced model's accuracy falls against ``reference``'s interval, per set."""
        words = []
        for name in set_names:
            value, (_, low, high) = final_scores[name][0], reference[name]
            where = "below" if value < low else "above" if value > high else "inside"
            words.append(f"{name} {where}")
        return ", ".join(words)

    lines = [
        "# Structured MLP reduction of the demo's tiny CLIP on MNIST",
        "",
        "Written by `python benchmarks/bench_reduction.py` "
        f"(targets: parameters -{options.target_parameters:.0%}, FLOPs "
        f"-{options.target_flops:.0%}; each step cuts {options.step_flops:.0%} of the FLOPs, "
        f"then retrains {options.retrain_steps} steps at learning rate {options.retrain_lr}; "
        f"Taylor scores on {options.score_batches} training batches of 64; {seconds:.0f} s on "
        "one CPU thread).",
        "Dense model: the demo's `fast` CLIP pre-trained and fine-tuned (image side, fixed "
        "zero-shot head, 2 epochs). Widths: MLP `intermediate_size` of the vision / text "
        f"tower. FLOPs: one image and one {text_length}-token prompt, 2 x multiply-accumulates "
        "of the matrix products (`hf_soups.pruning.model_counts`). Accuracy with its 95% Wilson "
        "interval, n = 1,000 per set; `test` is the clean test split, the others its shifted "
        "copies. One run, one seed: intervals cover test-set noise only.",
        "",
        "| model | parameters | FLOPs | widths (vision / text) | " + " | ".join(set_names) + " |",
        "|" + "---|" * (len(set_names) + 4),
    ]
    first_parameters, first_flops = rows[0][1], rows[0][2]
    for name, parameters, flops, widths, scores_ in rows:
        cells = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in scores_.values()]
        lines.append(
            f"| {name} | {parameters:,} (-{1 - parameters / first_parameters:.1%}) | "
            f"{flops:,} (-{1 - flops / first_flops:.1%}) | {widths[0]} / {widths[1]} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        f"Reached: parameters -{result.parameter_reduction:.1%}, FLOPs "
        f"-{result.flop_reduction:.1%} in {len(result.steps)} steps. The reduced model's "
        f"accuracy against the dense model's interval: {placement(rows[0][4])}; against the "
        f"equally retrained dense control's: {placement(rows[-2][4])}.",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
