"""Learned soup: peak host memory and time per step by placement, number of ingredients N and
block size K, on CLIP ViT-B/32-sized ingredients.

Generates its own checkpoints: a ``CLIPZeroShotClassifier`` over a default ``CLIPConfig``
(CLIP ViT-B/32: 151 M parameters, ~605 MB in float32, 10 classes) with random weights, the
others the same plus independent noise on the image tower and head (the text tower, which the
loss does not reach, is identical as in a real sweep). Then, for each row, one subprocess fits a
learned soup on random 224x224 images (``--examples`` of them, ``--batch-size`` per step, one
epoch) with :func:`hf_soups.learned.fit_mixing_coefficients` and reports:

- ``peak RSS``: the whole process's peak resident memory (``ru_maxrss``), imports included
  (about 0.8 GB of it: torch, transformers); the parent never loads a model, since a child
  inherits its parent's peak;
- ``setup s``: from the call to the first step (model load, tensor names, the first mix, and
  for ``host`` the stacking of every ingredient);
- ``s/step``: median interval between consecutive steps (mix or mix update, forward and
  backward, the coefficient gradients' reads, the optimiser step).

    python benchmarks/bench_learned.py                          # N = 2 8 32, ~10 min, ~20 GB disk
    python benchmarks/bench_learned.py --n 2 8 --out-dir /data/bench_learned   # keep checkpoints
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20
TRAINED = ("clip.vision_model.", "clip.visual_projection.", "classifier.")


def make_checkpoints(root: Path, count: int) -> list[Path]:
    """``count`` ingredient folders under ``root`` (kept and reused when already there)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig

    from hf_soups.models import CLIPZeroShotClassifier

    first = root / "ft00"
    if not (first / "model.safetensors").is_file():
        config = CLIPConfig(id2label={i: f"class {i}" for i in range(10)})
        torch.manual_seed(0)
        CLIPZeroShotClassifier(config).save_pretrained(first, max_shard_size="5GB")
    base = load_file(str(first / "model.safetensors"))
    folders = [first]
    generator = torch.Generator().manual_seed(1)
    for index in range(1, count):
        folder = root / f"ft{index:02d}"
        folders.append(folder)
        if (folder / "model.safetensors").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
            if name.startswith(TRAINED) and tensor.is_floating_point()
            else tensor
            for name, tensor in base.items()
        }
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(first / "config.json", folder / "config.json")
        del state
    return folders


class RandomImages:
    """Random images and labels, fetched a batch at a time (what the fit asks of a dataset)."""

    def __init__(self, count: int):
        import torch

        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, 224, 224, generator=generator)
        self.labels = torch.randint(0, 10, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices):
        return {"pixel_values": self.images[indices], "labels": self.labels[indices]}


def child(args: argparse.Namespace) -> None:
    """One fit, measured from inside; prints one JSON line."""
    import torch

    from hf_soups.ingredients import Ingredient
    from hf_soups.learned import MixedModel, fit_mixing_coefficients

    torch.set_num_threads(args.threads)
    ingredients = [Ingredient.from_folder(f) for f in sorted(Path(args.root).glob("ft*"))[: args.n]]
    data = RandomImages(args.examples)
    stamps = []
    gradients = MixedModel.gradients

    def timed(self, *a, **k):
        stamps.append(time.perf_counter())
        return gradients(self, *a, **k)

    MixedModel.gradients = timed
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    fit = fit_mixing_coefficients(
        ingredients,
        data,
        epochs=1,
        batch_size=args.batch_size,
        memory=args.memory,
        block_size=args.block,
        device="cpu",
        progress=False,
    )
    end = time.perf_counter()
    stamps.append(end)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    print(
        json.dumps(
            {
                "memory": fit.options["memory"],
                "peak_rss_mib": peak / MiB,
                "baseline_rss_mib": baseline / MiB,
                "setup_s": stamps[0] - start,
                "step_s": statistics.median(steps),
                "steps": len(stamps) - 1,
                "total_s": end - start,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--memory", nargs="+", default=["stream", "host"])
    parser.add_argument("--block", type=int, nargs="*", default=[4], help="block sizes K")
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--max-stack-gib",
        type=float,
        default=6.0,
        help="skip host/device rows whose stack would exceed this (shared machines)",
    )
    parser.add_argument("--out-dir", type=Path, help="keep the checkpoints here")
    parser.add_argument("--json", type=Path, help="write the raw rows here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--memory-one", dest="memory_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        make_checkpoints(Path(args.root), args.generate)
        return None
    if args.child:
        args.n, args.memory = args.n[0], args.memory_one
        args.block = args.block[0] if args.block else None
        return child(args)

    root = args.out_dir or Path(tempfile.mkdtemp(prefix="bench_learned_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        # In a subprocess of its own, as every fit: a child inherits its parent's peak RSS.
        subprocess.run(
            [sys.executable, __file__, "--generate", str(max(args.n)), "--root", str(root)],
            check=True,
        )
        print(f"checkpoints: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        # 88 M parameters of the image tower and head are mixed, in float32
        trained_bytes = 352 * 10**6
        runs = [(memory, n, None) for n in args.n for memory in args.memory]
        runs += [("stream", n, k) for n in args.n for k in args.block if k < n]
        rows = []
        for memory, n, block in runs:
            if memory != "stream" and n * trained_bytes > args.max_stack_gib * 2**30:
                rows.append({"memory": memory, "n": n, "block": block, "skipped": True})
                continue
            command = [
                sys.executable, __file__, "--child", "--root", str(root), "--n", str(n),
                "--memory-one", memory, "--examples", str(args.examples),
                "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                "--block", *([str(block)] if block else []),
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            run = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if run.returncode != 0:
                raise SystemExit(run.stderr[-3000:])
            row = {"n": n, "block": block, **json.loads(run.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        print(table(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        if args.out_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def table(rows: list[dict]) -> str:
    lines = [
        "| memory | N | block K | peak RSS MiB | setup s | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        block = row["block"] or "all"
        if row.get("skipped"):
            lines.append(f"| {row['memory']} | {row['n']} | {block} | skipped | | |")
            continue
        lines.append(
            f"| {row['memory']} | {row['n']} | {block} | {row['peak_rss_mib']:.0f} "
            f"| {row['setup_s']:.1f} | {row['step_s']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
