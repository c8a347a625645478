"""Greedy-soup cost: bytes read per ingredient, and where the time goes.

Generates N ViT checkpoints (random weights, a shared start plus noise; nothing downloaded) and
a held-out set of random images, then runs :class:`hf_soups.soup.SoupBuilder` as a user would:

1. **scoring pass**: ``score_ingredients`` loads and scores every ingredient alone
   (``load_model(folder)``: transformers reads the weights from the safetensors files);
2. **greedy pass**: ``greedy`` sorts them and makes one pass, keeping a float32 running sum, so
   each ingredient's weights are read once (``Ingredient.read``) and each candidate soup is
   built in memory (``load_model(folder, state_dict)``) and scored;
3. **save**: ``Soup.save_pretrained`` streams the kept ingredients through the merge engine.

Bytes read are counted per ingredient by wrapping ``hf_soups.ingredients.read_tensor`` (hf_soups'
own reads) and the ``safe_open`` that ``transformers.modeling_utils`` uses (the bytes of every
tensor transformers takes from a file), and shown as multiples of the ingredient's size (the
sum of its tensors' bytes). Time is split by wrapping ``read_tensor`` (reading),
``hf_soups.soup.load_model`` (model building, which in the scoring pass includes transformers
reading the file) and ``hf_soups.builder.as_scorer`` (evaluation); the rest of a pass is merge
arithmetic (float32 casts, the running sum, the candidate average) and bookkeeping.

    python benchmarks/bench_greedy.py                    # small ViT (~19 MB), N = 4 8
    python benchmarks/bench_greedy.py --size tiny --n 4  # a seconds-long check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

SIZES = {
    "tiny": dict(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, intermediate_size=256
    ),
    "small": dict(
        image_size=32, patch_size=8, hidden_size=256, num_hidden_layers=6, intermediate_size=1024
    ),
}
MiB = 2**20


def make_checkpoints(root: Path, size: str, n: int, examples: int):
    """N fine-tune-like ViT folders (one start plus noise) and a saved held-out dataset."""
    import datasets
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(**SIZES[size], num_attention_heads=4, num_labels=10)
    torch.manual_seed(0)
    start = ViTForImageClassification(config)
    folders = []
    for i in range(n):
        model = ViTForImageClassification(config)
        with torch.no_grad():
            for mine, theirs in zip(model.parameters(), start.parameters()):
                mine.copy_(theirs + 0.01 * torch.randn_like(theirs))
        model.save_pretrained(root / f"ingredient-{i}")
        folders.append(root / f"ingredient-{i}")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(examples, 3, config.image_size, config.image_size, generator=generator)
    labels = torch.randint(0, config.num_labels, (examples,), generator=generator)
    data = datasets.Dataset.from_dict({"pixel_values": images.numpy(), "labels": labels.numpy()})
    data.save_to_disk(str(root / "held_out"))
    return folders, root / "held_out"


class Meter:
    """Bytes read per file and seconds per bucket, collected by wrapping functions."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.bytes.clear()
        self.seconds.clear()

    def timed(self, bucket: str, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[bucket] += time.perf_counter() - start

        return wrapper


class CountingHandle:
    """A ``safe_open`` handle that counts the bytes of every tensor taken from it."""

    def __init__(self, handle, file: str, meter: Meter, itemsizes: dict[str, int]):
        self._handle, self._file, self._meter, self._itemsizes = handle, file, meter, itemsizes

    def get_slice(self, name):
        piece = self._handle.get_slice(name)
        count = 1
        for dim in piece.get_shape():
            count *= dim
        self._meter.bytes[self._file] += count * self._itemsizes[piece.get_dtype()]
        return piece

    def get_tensor(self, name):
        tensor = self._handle.get_tensor(name)
        self._meter.bytes[self._file] += tensor.numel() * tensor.element_size()
        return tensor

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


@contextlib.contextmanager
def instrumented(meter: Meter):
    """Wrap the reading, model-building and scoring functions the soup builder calls."""
    import transformers.modeling_utils as modeling_utils

    import hf_soups.builder as soup
    import hf_soups.ingredients as ingredients
    from hf_soups.ingredients import SAFETENSORS_DTYPES

    itemsizes = {name: dtype.itemsize for name, dtype in SAFETENSORS_DTYPES.items()}
    originals = (ingredients.read_tensor, soup.load_model, soup.as_scorer, modeling_utils.safe_open)

    def read_tensor(info, name):
        meter.bytes[str(info.file)] += info.nbytes
        return originals[0](info, name)

    def safe_open(file, *args, **kwargs):
        return CountingHandle(originals[3](file, *args, **kwargs), str(file), meter, itemsizes)

    ingredients.read_tensor = meter.timed("read", read_tensor)
    soup.load_model = meter.timed("load_model", originals[1])
    soup.as_scorer = lambda *args, **kwargs: meter.timed("evaluate", originals[2](*args, **kwargs))
    modeling_utils.safe_open = safe_open
    try:
        yield
    finally:
        (
            ingredients.read_tensor,
            soup.load_model,
            soup.as_scorer,
            modeling_utils.safe_open,
        ) = originals


def per_ingredient(meter: Meter, builder) -> list[float]:
    """Bytes read from each ingredient's files, as multiples of its size."""
    ratios = []
    for ingredient in builder.ingredients:
        size = sum(info.nbytes for info in ingredient.tensors.values())
        files = {str(info.file) for info in ingredient.tensors.values()}
        ratios.append(sum(meter.bytes.get(file, 0) for file in files) / size)
    return ratios


def run_one(folders: list[Path], held_out: Path, out: Path, batch_size: int) -> list[dict]:
    import datasets
    from accelerate import Accelerator

    from hf_soups.builder import SoupBuilder
    from hf_soups.evaluation import Evaluator

    evaluator = Evaluator(
        datasets.load_from_disk(str(held_out)),
        batch_size=batch_size,
        accelerator=Accelerator(cpu=True),
        progress=False,
        name="held_out",
    )
    builder = SoupBuilder.from_pretrained([str(f) for f in folders])
    meter = Meter()
    rows = []
    with instrumented(meter):
        passes = {
            "scoring pass": lambda: builder.score_ingredients(evaluator),
            "greedy pass": lambda: builder.greedy(evaluator),
        }
        soup = None
        for name, run in passes.items():
            meter.reset()
            start = time.perf_counter()
            result = run()
            total = time.perf_counter() - start
            soup = result if name == "greedy pass" else soup
            rows.append(_row(name, meter, builder, total))
        meter.reset()
        start = time.perf_counter()
        soup.save_pretrained(out, progress=False)
        rows.append(
            _row(
                f"save ({len(soup.ingredients)} kept)", meter, builder, time.perf_counter() - start
            )
        )
    return rows


def _row(name: str, meter: Meter, builder, total: float) -> dict:
    ratios = per_ingredient(meter, builder)
    timed = {key: meter.seconds.get(key, 0.0) for key in ("read", "load_model", "evaluate")}
    return {
        "pass": name,
        "read_x_min": min(ratios),
        "read_x_max": max(ratios),
        "read_x": ratios,
        **{f"{key}_s": value for key, value in timed.items()},
        "other_s": total - sum(timed.values()),
        "total_s": total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8], help="numbers of ingredients")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--examples", type=int, default=256, help="held-out images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import logging

    import torch

    torch.set_num_threads(args.torch_threads)
    logging.disable(logging.WARNING)  # greedy's "kept only the best" on random weights
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folders, held_out = make_checkpoints(root / "inputs", args.size, max(args.n), args.examples)
        size = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))
        for n in args.n:
            rows = run_one(folders[:n], held_out, root / f"soup-{n}", args.batch_size)
            shutil.rmtree(root / f"soup-{n}")
            results[n] = rows
    print(
        f"\nViT `{args.size}` ({size / MiB:.1f} MiB per ingredient), {args.examples} held-out "
        f"images, batch {args.batch_size}, {args.torch_threads} torch thread(s)\n"
    )
    header = [
        "N",
        "pass",
        "bytes read per ingredient",
        "read s",
        "merge arithmetic + other s",
        "load_model s",
        "evaluate s",
        "total s",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n, rows in results.items():
        for row in rows:
            low, high = row["read_x_min"], row["read_x_max"]
            read = f"{low:.2f}x" if abs(high - low) < 5e-3 else f"{low:.2f}x-{high:.2f}x"
            cells = [
                str(n),
                row["pass"],
                read,
                *(f"{row[key]:.2f}" for key in ("read_s", "other_s", "load_model_s", "evaluate_s")),
                f"{row['total_s']:.2f}",
            ]
            print("| " + " | ".join(cells) + " |")
    print()
    for n, rows in results.items():
        totals = [sum(column) for column in zip(*(row["read_x"] for row in rows))]
        print(
            f"N = {n}: bytes read per ingredient over the three passes: "
            + ", ".join(f"{total:.2f}x" for total in totals)
            + " (2x for an ingredient greedy dropped, 3x for one it kept)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
