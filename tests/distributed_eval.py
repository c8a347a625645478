"""Evaluate tiny models under `accelerate launch`; launched by tests/test_evaluation.py.

The test imports `make_dataset` and `make_models` from this file to compute the same
evaluation in a single process (and with plain torch), then compares the saved results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from hf_soups.evaluation import Evaluator

FEATURES = 12
CLASSES = 7
METRICS = ["accuracy", "top_3_accuracy"]


class CountingLinear(nn.Module):
    """A linear classifier called as model(pixel_values=x) that counts the rows it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, CLASSES)
        self.rows_seen = 0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.rows_seen += pixel_values.shape[0]
        return self.linear(pixel_values)


def make_dataset(n: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict(
        {
            "pixel_values": rng.normal(size=(n, FEATURES)).astype(np.float32),
            "labels": rng.integers(0, CLASSES, size=n),
        }
    )


def make_models(count: int, seed: int = 0) -> list[CountingLinear]:
    torch.manual_seed(seed)
    return [CountingLinear() for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=101)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    evaluator = Evaluator(
        make_dataset(args.n),
        METRICS,
        batch_size=args.batch_size,
        accelerator=accelerator,
        progress=False,
    )
    models = make_models(3)
    single = evaluator.evaluate(models[0], name="single")
    models[0].rows_seen = 0
    ensemble = evaluator.evaluate_ensemble(models, name="ensemble")
    rows_seen = accelerator.gather(torch.tensor([models[0].rows_seen])).tolist()
    if accelerator.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        single.save(args.out / "single.json")
        ensemble.save(args.out / "ensemble.json")
        meta = {"num_processes": accelerator.num_processes, "rows_seen_per_process": rows_seen}
        (args.out / "meta.json").write_text(json.dumps(meta))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
