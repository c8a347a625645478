"""Cold start: ``--help`` and argument errors import no heavy library, and a merge of plain
safetensors folders needs neither transformers nor open_clip.

Each case runs in a fresh interpreter (a test process has long imported everything) through a
small runner that calls the command line's ``main`` with the arguments, then prints which
of the heavy modules ended up in ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import (
    assert_matches_reference,
    load_weights,
    weighted_reference,
    write_weights_folder,
)

from hf_soups.commands.merge import DTYPES, MERGE_METHODS
from hf_soups.methods import BY_NAME

HEAVY = [
    "torch",
    "transformers",
    "open_clip",
    "datasets",
    "accelerate",
    "safetensors.torch",
    "matplotlib",
]

RUNNER = """
import json, sys
watched = json.loads(sys.argv[2])
from hf_soups.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as done:
    code = done.code
heavy = [name for name in watched if name in sys.modules]
print(json.dumps({"code": code, "imported": heavy}), file=sys.__stderr__)
"""


def run_cli(args: list[str], cwd=None) -> tuple[dict, str, str]:
    """Run ``hf-soups ARGS`` in a fresh interpreter: (runner report, stdout, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(args), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    *stderr, report = done.stderr.strip().splitlines()
    return json.loads(report), done.stdout, "\n".join(stderr)


COMMANDS = ["demo", "merge", "soup", "wise-ft", "patch", "push", "card", "diagnose"]


@pytest.mark.parametrize("args", [["--help"], *([name, "--help"] for name in COMMANDS)])
def test_help_imports_no_heavy_library(args):
    report, out, _ = run_cli(args)
    assert report == {"code": 0, "imported": []}
    assert "usage: hf-soups" in out


@pytest.mark.parametrize(
    "args",
    [
        [],  # no command
        ["merge"],  # no sources, no --out
        ["merge", "a", "b", "--out", "x", "--method", "nonsense"],
        ["merge", "a", "b", "--out", "x", "--dtype", "float8"],
        ["wise-ft", "a", "b", "--out", "x"],  # neither --alpha nor --sweep
        ["frobnicate"],
    ],
)
def test_argument_errors_import_no_heavy_library(args):
    report, out, err = run_cli(args)
    assert report == {"code": 2, "imported": []}
    assert out == "" and "error:" in err.splitlines()[-1]
    # One line, like every other mistake (argparse's usage block is not repeated).
    assert len(err.strip().splitlines()) == 1, err


def test_merge_of_plain_safetensors_needs_neither_transformers_nor_open_clip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    folders = [
        write_weights_folder(
            tmp_path / name,
            {
                "layer.weight": torch.randn(5, 3, generator=generator),
                "layer.bias": torch.randn(5, generator=generator),
                "steps": torch.tensor([7]),
            },
        )
        for name in ("a", "b")
    ]
    out = tmp_path / "soup"
    args = ["-q", "merge", *map(str, folders), "--out", str(out), "--weights", "0.25,0.75"]
    report, stdout, err = run_cli(args)
    assert report["code"] == 0, err
    assert {"transformers", "open_clip", "datasets", "matplotlib"}.isdisjoint(report["imported"])
    assert stdout.startswith(f"Merged 2 checkpoints into {out}")
    assert_matches_reference(load_weights(out), weighted_reference(folders, [0.25, 0.75]))


def test_card_of_a_vit_soup_counts_its_size_without_transformers(tmp_path):
    # The card's parameter and FLOP counts come from config.json read as JSON.
    from tiny import make_vit_folder

    from hf_soups.merge import merge

    folders = [str(make_vit_folder(tmp_path / f"m{i}", seed=i)) for i in range(2)]
    out = merge(folders, tmp_path / "soup", progress=False)
    (out / "README.md").unlink()
    report, stdout, err = run_cli(["-q", "card", str(out)])
    assert report["code"] == 0, err
    assert {"transformers", "open_clip", "datasets", "matplotlib"}.isdisjoint(report["imported"])
    assert "## Model size" in (out / "README.md").read_text()


def test_the_static_lists_of_the_parser_match_the_library():
    # The parser lists methods and dtypes without importing torch; they must not drift.
    assert sorted(MERGE_METHODS) == sorted(BY_NAME)
    assert all(getattr(torch, name).is_floating_point for name in DTYPES)


def test_the_installed_command_exits_with_mains_code_and_flushed_output(tmp_path):
    # hf-soups leaves through os._exit (no interpreter teardown): what it printed to a pipe
    # and logged must still arrive, and its exit code be main's.
    from tiny import make_vit_folder

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = str(Path(sys.executable).with_name("hf-soups"))
    missing = tmp_path / "missing"
    done = subprocess.run([command, "card", str(missing)], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == f"hf-soups card: error: {missing}: no such file or folder"
    folders = [str(make_vit_folder(tmp_path / f"m{i}", seed=i)) for i in range(2)]
    out = tmp_path / "soup"
    done = subprocess.run(
        [sys.executable, "-m", "hf_soups.cli", "merge", *folders, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"Merged 2 checkpoints into {out} (1 safetensors file(s))"
    assert f"INFO hf_soups.merge: Merged 2 ingredients into {out}" in done.stderr


def test_quiet_and_debug_are_taken_after_the_command_too():
    from hf_soups.cli import build_parser

    parser = build_parser()
    after = parser.parse_args(["card", "folder", "-q", "--debug"])
    before = parser.parse_args(["-q", "card", "folder"])
    neither = parser.parse_args(["card", "folder"])
    assert (after.quiet, after.debug) == (True, True)
    assert (before.quiet, before.debug) == (True, False)
    assert (neither.quiet, neither.debug) == (False, False)
