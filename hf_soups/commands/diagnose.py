"""``hf-soups diagnose SOURCE [SOURCE ...]``: will averaging these checkpoints work?

Prints pairwise weight statistics, interpolation barriers (with ``--recipe``) and a verdict per
checkpoint; with ``--out``, also writes ``diagnostics.json`` and the plots there. The recipe
holds one eval set under ``held_out``, with the keys of a soup recipe's ``held_out`` (see
:mod:`hf_soups.recipe.soup_file`); a soup recipe itself works, its other keys are not used::

    held_out:
      dataset: data/validation   # a Dataset.save_to_disk folder, relative to this file
      metric: accuracy
"""

from __future__ import annotations

import argparse

REPORT_FILE = "diagnostics.json"
_PAIRS = ("reference", "soup", "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diagnose",
        help="check whether checkpoints can be averaged (distances, barriers, verdicts)",
        description="Soupability diagnostics: pairwise weight distances and cosines streamed "
        "tensor by tensor, linear-interpolation barriers scored on held-out data (--recipe), "
        "and a verdict per checkpoint.",
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="folders or Hub ids")
    parser.add_argument("--base", help="the common pre-trained start (cosines of deltas)")
    parser.add_argument(
        "--recipe", help="YAML with a 'held_out' eval set to score interpolation paths"
    )
    parser.add_argument(
        "--points", type=int, default=5, help="models per path, ends included (default 5)"
    )
    parser.add_argument(
        "--pairs",
        choices=_PAIRS,
        default="reference",
        help="paths: each against the reference (the medoid, default), against the uniform "
        "soup, or all pairs",
    )
    parser.add_argument("--out", help="write diagnostics.json and the plots into this folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from hf_soups.diagnostics import check_soupability, write_plots
    from hf_soups.output import atomic_output_dir, check_output_dir
    from hf_soups.recipe.soup_file import load_held_out

    inputs = [*args.sources, *([args.base] if args.base else [])]
    if args.out is not None:
        # Fail before the measurements, not after.
        check_output_dir(args.out, args.overwrite, inputs=inputs)
    evaluator = load_held_out(args.recipe) if args.recipe else None
    report = check_soupability(
        args.sources,
        base=args.base,
        evaluator=evaluator,
        points=args.points,
        pairs=args.pairs,
        progress=not args.quiet,
    )
    print(report.table())
    if args.out is not None:
        with atomic_output_dir(args.out, overwrite=args.overwrite, inputs=inputs) as work_dir:
            write_plots(report, work_dir)
            report.save(work_dir / REPORT_FILE)
        print(f"Wrote {REPORT_FILE} and {len(report.plots)} plot(s) to {args.out}")
