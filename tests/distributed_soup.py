"""The README's quick start and a WiSE-FT sweep, alone or under ``accelerate launch``.

Launched by tests/test_multiprocess.py with 2 CPU processes (gloo), and run once more as a
plain single process; the test compares what both wrote. ``--mode soups``: greedy soup ->
``save_pretrained`` -> ``push_to_hub`` (to the stand-in Hub named by ``HF_ENDPOINT``), then
``choose_wise_ft`` -> ``save_pretrained``, on the datasets ``<data>/validation`` and
``<data>/shifted``. ``--mode fail``: the processes disagree on a decision
(caught), a function run on the main process raises a ValueError (caught), then the main
process's save fails (not caught). ``--mode alone``: a CPU launch whose Accelerator was not
told ``cpu=True``, so each process runs alone; the save must refuse. Every process writes what it saw to
``<out>/process<i>.json`` and prints ``process <i> raised <Error>: <message>`` for an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator

from hf_soups import Evaluator, SoupBuilder
from hf_soups.distributed import check_agreement, on_main_process
from hf_soups.patching import choose_wise_ft


def soups(args, accelerator: Accelerator) -> dict:
    def evaluator(name: str) -> Evaluator:
        dataset = datasets.load_from_disk(args.data / name)
        return Evaluator(dataset, batch_size=4, accelerator=accelerator, progress=False)

    # The quick start, as the README writes it.
    builder = SoupBuilder.from_hub(args.ingredients)
    held_out = evaluator("validation")
    soup = builder.greedy(held_out)
    saved = soup.save_pretrained(args.out / "greedy-soup", progress=False)
    commit = soup.push_to_hub(args.repo_id)
    # WiSE-FT between the first ingredient and the soup, alpha chosen on held-out data.
    result = choose_wise_ft(
        args.ingredients[0],
        saved,
        in_distribution={"val": held_out},
        shifted={"val_shift": evaluator("shifted")},
        alphas=[0.0, 0.5, 1.0],
        progress=False,
    )
    wise_ft_saved = result.save_pretrained(args.out / "wise-ft", progress=False)
    return {
        "kept": [ingredient.name for ingredient in soup.ingredients],
        "saved": str(saved),
        "commit": commit.oid,
        "alpha": result.alpha,
        "wise_ft_saved": str(wise_ft_saved),
    }


def fail(args, accelerator: Accelerator) -> dict:
    seen = {}
    try:
        check_agreement({"alpha": 0.5 * accelerator.process_index}, "a test decision")
    except Exception as error:
        seen["disagreement"] = f"{type(error).__name__}: {error}"
    try:
        on_main_process(int, "not a number")
    except Exception as error:
        seen["foreign_error"] = f"{type(error).__name__}: {error}"
    (args.out / f"process{accelerator.process_index}.json").write_text(json.dumps(seen))
    # args.out already holds this file: the main process's save refuses to overwrite it.
    SoupBuilder.from_hub(args.ingredients).uniform().save_pretrained(args.out, progress=False)
    return seen


def alone(args, accelerator: Accelerator) -> dict:
    SoupBuilder.from_hub(args.ingredients).uniform().save_pretrained(args.out, progress=False)
    return {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["soups", "fail", "alone"], required=True)
    parser.add_argument("--ingredients", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repo-id", default="acme/greedy-soup")
    parser.add_argument("--data", type=Path, help="datasets saved with save_to_disk")
    args = parser.parse_args()

    torch.set_num_threads(1)
    # "alone": the Accelerator a script gets without cpu=True on a machine with no GPU.
    accelerator = Accelerator(cpu=args.mode != "alone")
    rank = int(os.environ.get("RANK", 0))  # the launcher's, whatever Accelerate makes of it
    try:
        seen = {"soups": soups, "fail": fail, "alone": alone}[args.mode](args, accelerator)
    except Exception as error:
        print(f"process {rank} raised {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        raise
    seen["num_processes"] = accelerator.num_processes
    (args.out / f"process{rank}.json").write_text(json.dumps(seen))
    accelerator.end_training()


if __name__ == "__main__":
    main()
