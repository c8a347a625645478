"""``hf-soups merge SOURCE [SOURCE ...] --out DIR``: a streaming weighted merge."""

from __future__ import annotations

import argparse

import torch

from hf_soups.errors import InvalidWeightsError
from hf_soups.merge import merge

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_weights(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise InvalidWeightsError(f"--weights: {text!r} is not a comma-separated list of numbers")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="average checkpoints tensor by tensor into a new model folder",
        description="Merge checkpoints (local folders or Hub ids org/name[@revision]) into one "
        "model folder, streaming tensor by tensor. Default: a uniform average.",
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE")
    parser.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    parser.add_argument(
        "--weights", type=str, help="comma-separated mixing weights, one per source"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="shard size limit (default 5GB)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype of floating tensors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .bin/.pt checkpoints (loaded with torch.load(weights_only=True))",
    )
    parser.add_argument(
        "--allow-non-finite", action="store_true", help="warn instead of failing on NaN/inf"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from hf_soups.merge import as_ingredients

    ingredients = as_ingredients(args.sources, allow_pickle=args.allow_pickle)
    weights = parse_weights(args.weights) if args.weights else None
    out = merge(
        ingredients,
        args.out,
        weights=weights,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_non_finite=args.allow_non_finite,
        progress=not args.quiet,
    )
    n_files = len(list(out.glob("*.safetensors")))
    print(f"Merged {len(ingredients)} checkpoints into {out} ({n_files} safetensors file(s))")
