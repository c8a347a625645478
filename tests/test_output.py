"""``hf_soups.output``: outputs never touch inputs, interrupted writes leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from hf_soups.errors import OutputExistsError, OutputOverlapsInputError
from hf_soups.output import atomic_output_dir, check_output_dir, final_path


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """Two input folders under ``inputs/``, a Hub cache elsewhere, and a neutral current folder."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache" / "hub"))
    (tmp_path / "cache" / "hub").mkdir(parents=True)
    (tmp_path / "work" / "here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "here")
    for name in ("a", "b"):
        (tmp_path / "inputs" / name).mkdir(parents=True)
        (tmp_path / "inputs" / name / "model.safetensors").write_bytes(b"weights")
    return tmp_path


@pytest.mark.parametrize(
    "output, relation",
    [
        ("inputs/a", "is"),
        ("inputs/a/", "is"),
        ("inputs/b/../a", "is"),
        ("inputs", "contains"),
        (".", "contains"),
        ("inputs/a/soup", "lies inside"),
        ("inputs/a/x/y", "lies inside"),
    ],
)
def test_outputs_touching_an_input_are_refused_even_with_overwrite(tree, output, relation):
    target = str(tree / output)
    for overwrite in (False, True):
        with pytest.raises(OutputOverlapsInputError) as caught:
            check_output_dir(target, overwrite, inputs=[tree / "inputs" / "a", "acme/hub-id"])
        assert str(caught.value).startswith(f"{target}: the output {relation} the input ")


def test_the_hub_cache_and_the_current_folder_are_protected(tree):
    with pytest.raises(OutputOverlapsInputError, match="lies inside the Hub cache"):
        check_output_dir(tree / "cache" / "hub" / "models--x", inputs=[])
    with pytest.raises(OutputOverlapsInputError, match="is the current folder"):
        check_output_dir(".", overwrite=True)
    with pytest.raises(OutputOverlapsInputError, match="contains the Hub cache"):
        check_output_dir(tree / "cache", overwrite=True)
    with pytest.raises(OutputOverlapsInputError, match="contains the current folder"):
        check_output_dir(tree / "work", overwrite=True)
    # Inside the current folder is where outputs usually go.
    assert check_output_dir("soup") == Path("soup")


def test_neighbours_of_inputs_are_fine(tree):
    inputs = [tree / "inputs" / "a"]
    for neighbour in ("inputs/a-soup", "inputs/c", "elsewhere"):
        assert check_output_dir(tree / neighbour, inputs=inputs) == tree / neighbour
    (tree / "inputs" / "b" / "soup").mkdir()
    (tree / "inputs" / "b" / "soup" / "old.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        check_output_dir(tree / "inputs" / "b" / "soup", inputs=inputs)


def test_a_symlink_to_an_input_is_that_input(tree):
    link = tree / "link"
    link.symlink_to(tree / "inputs" / "a", target_is_directory=True)
    with pytest.raises(OutputOverlapsInputError, match="is the input"):
        check_output_dir(link, overwrite=True, inputs=[tree / "inputs" / "a"])


def test_an_interrupted_write_keeps_the_old_output(tree):
    target = tree / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(target, overwrite=True) as work:
        (work / "half.txt").write_text("half")
        raise KeyboardInterrupt
    assert sorted(os.listdir(tree)) == ["cache", "inputs", "out", "work"]
    assert os.listdir(target) == ["old.txt"]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tree):
    target = tree / "out"
    gone = dead_pid()
    leftovers = [
        tree / f".out.tmp-{gone}-0123abcd",  # a killed run's temporary folder
        tree / f".out.old-{gone}-0123abcd",  # the previous output, moved aside by a killed run
    ]
    for leftover in leftovers:
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"partial")
    link = tree / f".out.old-{gone}-4567cdef"  # a replaced symlinked output
    link.symlink_to(tree / "inputs" / "b", target_is_directory=True)
    alive = tree / f".out.tmp-{os.getpid()}-89abcdef"
    alive.mkdir()
    other = tree / f".other.tmp-{gone}-0123abcd"  # another output's: not ours to judge
    other.mkdir()

    with atomic_output_dir(target) as work:
        (work / "new.txt").write_text("new")

    hidden = sorted(p.name for p in tree.iterdir() if p.name.startswith("."))
    assert hidden == sorted([alive.name, other.name])
    assert os.listdir(tree / "inputs" / "b") == ["model.safetensors"]  # the link's target kept
    assert os.listdir(target) == ["new.txt"]


def test_out_dot_dot_names_a_real_folder(tree):
    (tree / "x").mkdir()
    target = tree / "x" / ".." / "made"
    with atomic_output_dir(target) as work:
        (work / "f.txt").write_text("ok")
    assert (tree / "made" / "f.txt").read_text() == "ok"


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    """Another process fills the output folder while this one writes: the final rename is
    checked again, refused, and the other process's files are left as they were."""
    target = tmp_path / "soup"
    with (
        pytest.raises(OutputExistsError, match="already exists"),
        atomic_output_dir(target) as work,
    ):
        (work / "model.safetensors").write_bytes(b"mine")
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"theirs")
    assert (target / "model.safetensors").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]


def test_final_path_names_the_folder_a_nested_temporary_one_becomes(tmp_path):
    with atomic_output_dir(tmp_path / "soup") as work:
        (work / "sub").mkdir()
        with atomic_output_dir(work / "sub" / "plots") as inner:
            inside = inner / "sweep.png"
            assert ".tmp-" in str(inside)
            assert final_path(inside) == tmp_path / "soup" / "sub" / "plots" / "sweep.png"
    assert final_path(tmp_path / "plain" / "x") == tmp_path / "plain" / "x"
