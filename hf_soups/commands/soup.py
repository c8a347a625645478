"""``hf-soups soup RECIPE.yaml``: build a soup described in a YAML recipe.

The recipe format and its runner live in :mod:`hf_soups.recipe.soup_file`; this module only parses
the command line.
"""

from __future__ import annotations

import argparse
import importlib

# Old import paths (``from hf_soups.commands.soup import parse_recipe``), served on first use so
# that the command line's --help does not import the runner (and torch).
_MOVED = ("METHODS", "SOUP_METHODS", "parse_recipe", "run_recipe")


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module("hf_soups.recipe.soup_file"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "soup",
        help="build a soup (uniform, greedy, learned or a merge method) from a YAML recipe",
        description="Build a soup described in a YAML recipe: its sources, method, held-out "
        "data, eval sets, output folder and optional push to the Hub (see the hf_soups.recipe.soup_file "
        "module for the format).",
    )
    parser.add_argument("recipe", help="the soup recipe (YAML)")
    parser.add_argument("--out", help="output folder (overrides the recipe's 'out')")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from hf_soups.recipe.soup_file import run_recipe

    soup = run_recipe(args.recipe, out=args.out, overwrite=args.overwrite)
    print(soup.report())
