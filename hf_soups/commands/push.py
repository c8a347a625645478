"""``hf-soups push DIR REPO_ID``: upload a model folder to the Hub in one commit."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a model folder (weights, card, recipe, plots) to the Hub in one commit",
        description="Create the Hub model repository REPO_ID if needed and upload every file of "
        "DIR in a single commit. A folder with soup.json and no README.md gets its model card "
        "first. The token comes from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("folder", metavar="DIR", help="the model folder to upload")
    parser.add_argument("repo_id", metavar="REPO_ID", help="user/name or org/name")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to commit to (created if missing)")
    parser.add_argument("--commit-message", help="title of the commit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from hf_soups.hub import push_folder

    commit = push_folder(
        args.folder,
        args.repo_id,
        private=True if args.private else None,
        commit_message=args.commit_message,
        revision=args.revision,
    )
    print(f"Pushed {args.folder} to {commit.commit_url}")
