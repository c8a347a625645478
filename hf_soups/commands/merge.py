"""``hf-soups merge SOURCE [SOURCE ...] --out DIR``: a streaming weighted merge, or a merge
method (``--method ties --base BASE --param density=0.2 ...``)."""

from __future__ import annotations

import argparse

import torch
import yaml

from hf_soups.errors import InvalidWeightsError, MissingBaseError
from hf_soups.merge import merge
from hf_soups.methods import METHODS, WeightedAverage, get_method

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_weights(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise InvalidWeightsError(f"--weights: {text!r} is not a comma-separated list of numbers")


# The weighted average is the default, set by --weights.
MERGE_METHODS = sorted(name for name in METHODS if name != WeightedAverage.name)


def parse_params(items: list[str]) -> dict:
    """``["density=0.2", "scaling=[1, 0.5]"]`` -> ``{"density": 0.2, "scaling": [1, 0.5]}``;
    values are read as YAML, so numbers, lists and booleans keep their types."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param: {item!r} is not KEY=VALUE")
        try:
            params[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--param {key.strip()}: cannot read the value {value!r}") from None
    return params


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
    parser.add_argument(
        "--method",
        choices=MERGE_METHODS,
        help="a merge method instead of the weighted average (task vector methods need --base)",
    )
    parser.add_argument(
        "--base", help="the pre-trained model the fine-tuned SOURCEs started from (folder or id)"
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter of --method, repeatable (density=0.2, scaling=1.0, seed=0, ...)",
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

    method = None
    if args.method is not None:
        needs_base = METHODS[args.method].needs_base
        if needs_base and args.base is None:
            raise MissingBaseError(f"--method {args.method} needs --base (the pre-trained model)")
        if args.base is not None and not needs_base:
            raise ValueError(f"--base: method {args.method!r} does not use a base model")
        method = get_method(args.method, **parse_params(args.param))
    elif args.param or args.base is not None:
        raise ValueError("--param and --base apply to a --method")
    ingredients = as_ingredients(args.sources, allow_pickle=args.allow_pickle)
    base = as_ingredients([args.base], allow_pickle=args.allow_pickle)[0] if args.base else None
    weights = parse_weights(args.weights) if args.weights else None
    out = merge(
        ingredients,
        args.out,
        weights=weights,
        method=method,
        base=base,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_non_finite=args.allow_non_finite,
        progress=not args.quiet,
    )
    n_files = len(list(out.glob("*.safetensors")))
    print(f"Merged {len(ingredients)} checkpoints into {out} ({n_files} safetensors file(s))")
