"""``hf-soups patch RECIPE.yaml``: PAINT, from a recipe naming the models, eval sets and rule.

See :mod:`hf_soups.patching.recipe` for the format: ``zero_shot``, ``fine_tuned``, ``out``,
``alphas``, ``eval_sets`` and ``select: {patching: [...], supported: [...], max_drop: ...}``.
"""

from __future__ import annotations

import argparse

from hf_soups.commands.wise_ft import add_output_arguments, output_kwargs, report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "patch",
        help="PAINT: sweep zero-shot/fine-tuned interpolation, choose alpha, write the model",
        description="Patch a zero-shot model (Ilharco et al. 2022): score the interpolation "
        "with the fine-tuned model on the recipe's supported and patching tasks, choose alpha "
        "on that held-out data and write the patched model with its sweep and plot.",
    )
    parser.add_argument("recipe", metavar="RECIPE", help="patch recipe YAML")
    parser.add_argument("--out", help="output folder (default: the recipe's 'out')")
    parser.add_argument("--device", help="score models on this device (e.g. cuda)")
    add_output_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from hf_soups.distributed import on_main_process
    from hf_soups.output import check_output_dir
    from hf_soups.patching import DEFAULT_ALPHAS, load_eval_recipe, patch
    from hf_soups.patching.recipe import RecipeError

    recipe = load_eval_recipe(args.recipe, progress=not args.quiet)
    for key in ("zero_shot", "fine_tuned"):
        if getattr(recipe, key) is None:
            raise RecipeError(f"{args.recipe}: a patch recipe needs '{key}'")
    out = args.out or recipe.out
    if out is None:
        raise RecipeError(f"{args.recipe}: no 'out' folder (set it in the recipe or pass --out)")
    # Before the sweep: the output must not be, hold or lie in an input.
    # (On the main process, which writes it: another process could see it already written.)
    on_main_process(
        check_output_dir, out, args.overwrite, inputs=[recipe.zero_shot, recipe.fine_tuned]
    )
    result = patch(
        recipe.zero_shot,
        recipe.fine_tuned,
        supported=recipe.group(recipe.preserve),
        patching=recipe.group(recipe.target),
        alphas=recipe.alphas or DEFAULT_ALPHAS,
        max_supported_drop=recipe.max_drop,
        device=args.device,
        progress=not args.quiet,
    )
    path = result.save_pretrained(out, **output_kwargs(args))
    report(result, f"Wrote the patched model (alpha={result.alpha:g}) to {path}")
