"""``hf-soups wise-ft ZERO_SHOT FINE_TUNED``: interpolate at one alpha, or sweep and choose it.

``--alpha 0.5 --out DIR`` writes the interpolated model. ``--sweep 0:1:0.1 --recipe eval.yaml
--out DIR`` scores every alpha on the recipe's eval sets, chooses alpha by the recipe's rule
(see :mod:`hf_soups.patching.recipe`) and writes the chosen model with the sweep in
``soup.json`` and its plot.
"""

from __future__ import annotations

import argparse

from hf_soups.commands.merge import DTYPES, torch_dtype


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the commands that write an interpolated model folder."""
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--dtype", choices=DTYPES, help="output dtype of floating tensors")
    parser.add_argument("--max-shard-size", default="5GB", help="shard size limit (default 5GB)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "wise-ft",
        help="interpolate zero-shot and fine-tuned weights (WiSE-FT), or sweep and choose alpha",
        description="theta = (1 - alpha) * ZERO_SHOT + alpha * FINE_TUNED, every tensor "
        "(heads included). With --sweep, score each alpha on the eval sets of --recipe and write "
        "the model at the alpha the recipe's rule chooses.",
    )
    parser.add_argument("zero_shot", metavar="ZERO_SHOT", help="folder or Hub id (alpha = 0)")
    parser.add_argument("fine_tuned", metavar="FINE_TUNED", help="folder or Hub id (alpha = 1)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--alpha", type=float, help="mixing coefficient, e.g. 0.5")
    mode.add_argument(
        "--sweep", metavar="SPEC", help="alphas to score: start:stop:step (0:1:0.1) or 0,0.5,1"
    )
    parser.add_argument("--recipe", help="eval recipe YAML (eval sets and selection rule)")
    parser.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    parser.add_argument("--device", help="score models on this device (e.g. cuda)")
    add_output_arguments(parser)
    parser.set_defaults(func=run)


def output_kwargs(args: argparse.Namespace) -> dict:
    return {
        "overwrite": args.overwrite,
        "dtype": torch_dtype(args.dtype),
        "max_shard_size": args.max_shard_size,
        "progress": not args.quiet,
    }


def report(result, *lines: str) -> None:
    """Print the sweep table, the choice and ``lines`` (the CLI's output, not library
    logging), once under ``accelerate launch``."""
    from hf_soups.distributed import is_main_process

    if is_main_process():
        print(result.sweep.table())
        print(result.choice.describe())
        for line in lines:
            print(line)


def run(args: argparse.Namespace) -> None:
    from hf_soups.distributed import is_main_process, on_main_process
    from hf_soups.output import check_output_dir
    from hf_soups.patching import choose_wise_ft, load_eval_recipe, parse_alphas, wise_ft

    # Before any loading or scoring: the output must not be, hold or lie in an input.
    # (On the main process, which writes it: another process could see it already written.)
    on_main_process(
        check_output_dir, args.out, args.overwrite, inputs=[args.zero_shot, args.fine_tuned]
    )
    if args.alpha is not None:
        if args.recipe:
            raise ValueError("--recipe is used with --sweep only")
        out = on_main_process(
            wise_ft,
            args.zero_shot,
            args.fine_tuned,
            args.alpha,
            out_dir=args.out,
            **output_kwargs(args),
        )
        if is_main_process():
            print(f"Wrote WiSE-FT alpha={args.alpha:g} to {out}")
        return
    if not args.recipe:
        raise ValueError("--sweep needs --recipe eval.yaml (the eval sets to choose alpha on)")
    recipe = load_eval_recipe(args.recipe, zero_shot=args.zero_shot, progress=not args.quiet)
    result = choose_wise_ft(
        args.zero_shot,
        args.fine_tuned,
        in_distribution=recipe.group(recipe.target),
        shifted=recipe.group(recipe.preserve),
        alphas=parse_alphas(args.sweep),
        max_shifted_drop=recipe.max_drop,
        device=args.device,
        progress=not args.quiet,
    )
    out = result.save_pretrained(args.out, **output_kwargs(args))
    report(result, f"Wrote WiSE-FT alpha={result.alpha:g} to {out}")
