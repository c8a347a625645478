"""``hf-soups merge``: summary line on success, one-line errors with exit code 2 otherwise."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import (
    assert_matches_reference,
    load_weights,
    make_clip_folder,
    make_vit_folder,
    weighted_reference,
)

from hf_soups.cli import main
from hf_soups.errors import IncompatibleIngredientsError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return (
        make_vit_folder(root / "a", seed=0),
        make_vit_folder(root / "b", seed=1, max_shard_size="8KB"),
    )


@pytest.fixture
def folders(pristine, tmp_path):
    a = shutil.copytree(pristine[0], tmp_path / "a")
    b = shutil.copytree(pristine[1], tmp_path / "b")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    return a, b, outputs


def test_merge_prints_a_summary(folders, capsys):
    a, b, outputs = folders
    out = outputs / "soup"
    code = main(
        [
            "-q",
            "merge",
            str(a),
            str(b),
            "--out",
            str(out),
            "--weights",
            "0.25,0.75",
            "--max-shard-size",
            "10KB",
            "--dtype",
            "bfloat16",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    n_files = len(list(out.glob("*.safetensors")))
    assert n_files > 1
    assert lines == [f"Merged 2 checkpoints into {out} ({n_files} safetensors file(s))"]
    merged = load_weights(out)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert json.loads((out / "soup.json").read_text())["parameters"] == {"weights": [0.25, 0.75]}
    reference = weighted_reference([a, b], [0.25, 0.75])
    assert_matches_reference(merged, reference, rel_tol=2.0**-8)


def _nan_in_b(a, b, tmp_path):
    shard = sorted(b.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = math.nan
    save_file(tensors, shard, metadata={"format": "pt"})
    return [str(a), str(b)], [name, str(b)]


def _truncated(a, b, tmp_path):
    file = a / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    return [str(a), str(b)], [str(file)]


def _other_architecture(a, b, tmp_path):
    clip = make_clip_folder(tmp_path / "clip", seed=0)
    return [str(a), str(clip)], [str(clip), "architecture"]


def _pickle_only(a, b, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_weights(a), pickled / "pytorch_model.bin")
    return [str(a), str(pickled)], [str(pickled), "pytorch_model.bin", "allow_pickle"]


def _missing_tensor(a, b, tmp_path):
    file = a / "model.safetensors"
    tensors = load_file(file)
    tensors.pop("classifier.weight")
    save_file(tensors, file)
    return [str(a), str(b)], [str(b), "classifier.weight"]


BAD = {
    "missing source": lambda a, b, t: ([str(a), str(t / "nowhere")], [str(t / "nowhere")]),
    "weights count": lambda a, b, t: ([str(a), str(b), "--weights", "1"], ["1 weights for 2"]),
    "weights text": lambda a, b, t: ([str(a), str(b), "--weights", "0.5,x"], ["'0.5,x'"]),
    "weights nan": lambda a, b, t: ([str(a), str(b), "--weights", "nan,1"], ["nan"]),
    "shard size": lambda a, b, t: ([str(a), str(b), "--max-shard-size", "lots"], ["lots"]),
    "non-finite": _nan_in_b,
    "truncated": _truncated,
    "architecture": _other_architecture,
    "pickle only": _pickle_only,
    "missing tensor": _missing_tensor,
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_one_line_error(case, folders, tmp_path, capsys):
    a, b, outputs = folders
    args, fragments = BAD[case](a, b, tmp_path)
    code = main(["merge", *args, "--out", str(outputs / "soup")])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("hf-soups merge: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], captured.err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert captured.out == ""
    assert os.listdir(outputs) == []


def test_existing_output_is_refused_then_overwritten(folders, capsys):
    a, b, outputs = folders
    out = outputs / "soup"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["merge", str(a), str(b), "--out", str(out)]) == 2
    assert f"{out}: already exists" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]

    assert main(["-q", "merge", str(a), str(b), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    assert_matches_reference(load_weights(out), weighted_reference([a, b], [0.5, 0.5]))


def test_debug_raises_the_exception(folders, tmp_path):
    # Raised out of main, the exception reaches the interpreter, which prints the traceback.
    a, _, outputs = folders
    clip = make_clip_folder(tmp_path / "clip", seed=0)
    with pytest.raises(IncompatibleIngredientsError):
        main(["--debug", "merge", str(a), str(clip), "--out", str(outputs / "soup")])
    assert os.listdir(outputs) == []


def _hf_soups():
    return str(Path(sys.executable).with_name("hf-soups"))


def test_console_script_merges(folders):
    a, b, outputs = folders
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = outputs / "soup"
    done = subprocess.run(
        [_hf_soups(), "merge", str(a), str(b), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"Merged 2 checkpoints into {out} (1 safetensors file(s))"
    assert "Merging" in done.stderr  # the progress bar
    assert_matches_reference(load_weights(out), weighted_reference([a, b], [0.5, 0.5]))
