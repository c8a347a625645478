"""``hf-soups merge SOURCE [SOURCE ...] --out DIR``: a streaming weighted merge, or a merge
method (``--method ties --base BASE --param density=0.2 ...``)."""

from __future__ import annotations

import argparse
import math

# Output dtypes of floating tensors, by their torch names.
DTYPES = ("bfloat16", "float16", "float32")
# The registered merge methods but the weighted average, which --weights sets; listed here so
# that --help needs no torch (tests/test_cli_startup.py checks it against hf_soups.methods).
MERGE_METHODS = ("dare_linear", "dare_ties", "fisher", "model_stock", "task_arithmetic", "ties")


def torch_dtype(name: str | None):
    """The torch dtype named by ``--dtype``, or None."""
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def parse_weights(text: str) -> list[float]:
    from hf_soups.errors import InvalidWeightsError

    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise InvalidWeightsError(
            f"--weights: {text!r} is not a comma-separated list of numbers"
        ) from None


def check_weight_sum(weights: list[float], num_sources: int, normalize: bool) -> list[float]:
    """Refuse weights that cancel out (a model of zeros); rescale them to sum to one with
    ``normalize`` (the merge warns about weights that do not sum to one or are negative).
    A wrong count or a non-finite weight is left to the merge, whose error names it."""
    from hf_soups.errors import InvalidWeightsError

    if len(weights) != num_sources or not all(map(math.isfinite, weights)):
        return weights
    total = math.fsum(weights)
    if abs(total) <= 1e-9 * max(map(abs, weights)):
        raise InvalidWeightsError(
            f"--weights: {','.join(f'{w:g}' for w in weights)} sum to zero, which would write a "
            "model of zeros"
        )
    # Negative weights and sums other than one are warned about by the merge itself.
    return [weight / total for weight in weights] if normalize else weights


def parse_params(items: list[str]) -> dict:
    """``["density=0.2", "scaling=[1, 0.5]"]`` -> ``{"density": 0.2, "scaling": [1, 0.5]}``;
    values are read as YAML, so numbers, lists and booleans keep their types."""
    import yaml

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
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (must not exist, or be empty; never an input, nor inside one)",
    )
    parser.add_argument(
        "--weights",
        type=str,
        help="comma-separated mixing weights, one per source (negative ones allowed: -0.5,1.5)",
    )
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="rescale --weights to sum to 1 (otherwise a warning names their sum)",
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
    parser.add_argument(
        "--masks",
        choices=["shared", "intersection"],
        default="shared",
        help="pruned SOURCEs (pruning_mask.safetensors): keep their common mask (shared, the "
        "default: differing masks are an error) or the weights all of them keep (intersection)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="shard size limit (default 5GB)")
    parser.add_argument("--dtype", choices=DTYPES, help="output dtype of floating tensors")
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
    from hf_soups.errors import MissingBaseError
    from hf_soups.ingredients import check_distinct
    from hf_soups.merge import as_ingredients, merge
    from hf_soups.methods import METHODS, get_method
    from hf_soups.output import check_output_dir
    from hf_soups.pruning.soup_mask import soup_mask

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
    if args.normalize and not args.weights:
        raise ValueError("--normalize rescales --weights; give --weights")
    weights = None
    if args.weights:
        weights = check_weight_sum(parse_weights(args.weights), len(args.sources), args.normalize)
    # Before any Hub download or reading: the output must not be, hold or lie in an input.
    inputs = [*args.sources, *([args.base] if args.base else [])]
    check_output_dir(args.out, args.overwrite, inputs=inputs)
    ingredients = as_ingredients(args.sources, allow_pickle=args.allow_pickle)
    check_distinct(ingredients)
    base = as_ingredients([args.base], allow_pickle=args.allow_pickle)[0] if args.base else None
    out = merge(
        ingredients,
        args.out,
        weights=weights,
        method=method,
        base=base,
        dtype=torch_dtype(args.dtype),
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_non_finite=args.allow_non_finite,
        progress=not args.quiet,
        mask=soup_mask(ingredients, args.masks),
    )
    n_files = len(list(out.glob("*.safetensors")))
    print(f"Merged {len(ingredients)} checkpoints into {out} ({n_files} safetensors file(s))")
