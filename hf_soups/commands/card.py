"""``hf-soups card DIR``: (re)write a merged folder's model card from its recipe (or a reduced
folder's from its ``reduction.json``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "card",
        help="write a merged folder's README.md model card from its soup.json",
        description="Render the model card (README.md) of a merged model folder from the recipe "
        "and scores in its soup.json (of a reduced model from its reduction.json), replacing "
        "any existing README.md.",
    )
    parser.add_argument(
        "folder", metavar="DIR", help="a model folder holding soup.json (or reduction.json)"
    )
    parser.add_argument(
        "--model-name", help="title and model-index name (default: the folder's name)"
    )
    parser.add_argument(
        "--license",
        help="the model's license, a Hub license id such as 'mit' (recorded in soup.json; "
        "default: the license all ingredients' cards agree on, else none)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from hf_soups.cards import write_card
    from hf_soups.cards.reduction import REDUCTION_FILE, write_reduction_card
    from hf_soups.recipe.schema import RECIPE_FILE

    folder = Path(args.folder)
    if not (folder / RECIPE_FILE).is_file() and (folder / REDUCTION_FILE).is_file():
        if args.license is not None:
            raise ValueError("--license: a reduced model's card records no license yet")
        path = write_reduction_card(folder, model_name=args.model_name)
    else:
        path = write_card(folder, model_name=args.model_name, license=args.license)
    print(f"Wrote {path}")
