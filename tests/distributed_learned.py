"""Fit learned soups under `accelerate launch`; launched by tests/test_learned.py.

Every process fits on its share of each global batch; the main process writes the coefficients,
which the test compares with a single-process fit of the same options (`FITS`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator

from hf_soups.ingredients import Ingredient
from hf_soups.learned import fit_mixing_coefficients

FITS = {
    # no accelerator given: the fit finds the launched processes through PartialState
    "plain": dict(epochs=2, batch_size=8, seed=1),
    "by_layer_hyperplane_block": dict(
        by_layer=True,
        epochs=2,
        batch_size=8,
        seed=2,
        coefficients="hyperplane",
        block_size=2,
        dtype="float64",
    ),
}


class CountingRows:
    """The held-out set, counting the examples this process fetches (the probe's included)."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset.with_format("torch")
        self.rows = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> dict:
        self.rows += len(indices)
        return self.dataset[indices]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("folders", nargs="+")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    data = CountingRows(datasets.load_from_disk(str(args.data)))
    ingredients = [Ingredient.from_folder(folder) for folder in args.folders]
    results = {
        name: fit_mixing_coefficients(
            ingredients,
            data,
            memory="stream",
            accelerator=accelerator if name != "plain" else None,
            progress=False,
            **options,
        ).to_dict()
        for name, options in FITS.items()
    }
    rows = accelerator.gather(torch.tensor([data.rows])).tolist()
    if accelerator.is_main_process:
        results["num_processes"] = accelerator.num_processes
        results["rows_per_process"] = rows
        args.out.write_text(json.dumps(results))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
