"""``hf-soups merge``: summary line on success, one-line errors with exit code 2 otherwise."""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
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
from hf_soups.safetensors_writer import SafetensorsWriter


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
    "duplicate": lambda a, b, t: (
        [str(a), str(b), str(b / ".." / "b")],
        [f"{b / '..' / 'b'}: the same checkpoint as {b}", "--weights"],
    ),
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


# -- weights ----------------------------------------------------------------------------------


def test_negative_weights_parse_and_are_warned_about(folders, caplog):
    a, b, outputs = folders
    out = outputs / "soup"
    assert main(["merge", str(a), str(b), "--out", str(out), "--weights", "-0.5,1.5"]) == 0
    assert "negative weight(s) -0.5" in caplog.text
    assert "sum to" not in caplog.text
    # Once: the command line and the library do not both say it.
    assert sum("negative weight" in r.getMessage() for r in caplog.records) == 1
    assert_matches_reference(load_weights(out), weighted_reference([a, b], [-0.5, 1.5]))


def test_weights_not_summing_to_one_are_warned_about_or_normalized(folders, caplog):
    a, b, outputs = folders
    assert main(["merge", str(a), str(b), "--out", str(outputs / "raw"), "--weights", "2,2"]) == 0
    assert "sum to 4, not 1" in caplog.text and "--normalize" in caplog.text
    assert sum("sum to 4" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    assert_matches_reference(load_weights(outputs / "raw"), weighted_reference([a, b], [2, 2]))

    out = outputs / "normalized"
    args = ["merge", str(a), str(b), "--out", str(out), "--weights", "1,3", "--normalize"]
    assert main(args) == 0
    assert "sum to" not in caplog.text
    assert json.loads((out / "soup.json").read_text())["parameters"] == {"weights": [0.25, 0.75]}
    assert_matches_reference(load_weights(out), weighted_reference([a, b], [0.25, 0.75]))


@pytest.mark.parametrize("weights", ["0,0", "1,-1", "-0.25,0.25"])
def test_zero_sum_weights_are_refused_before_any_work(folders, tmp_path, capsys, weights):
    a, _, outputs = folders
    # The second source does not exist: the weights are refused before sources are resolved.
    missing = tmp_path / "nowhere"
    code = main(
        ["merge", str(a), str(missing), "--out", str(outputs / "soup"), "--weights", weights]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        f"hf-soups merge: error: --weights: {weights} sum to zero, which would write a model of zeros"
    ]
    assert os.listdir(outputs) == []


# -- the output never touches an input ------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def _overlapping_outputs(a, b, tmp_path):
    link = tmp_path / "link-to-a"
    link.symlink_to(a, target_is_directory=True)
    return {
        "is": (a, "the output is the input"),
        "contains": (a.parent, "the output contains the input"),
        "lies inside": (a / "soup", "the output lies inside the input"),
        "symlink to": (link, "the output is the input"),
    }


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case", ["is", "contains", "lies inside", "symlink to"])
def test_an_output_touching_an_input_is_refused(folders, tmp_path, capsys, case, overwrite):
    a, b, _ = folders
    out, expected = _overlapping_outputs(a, b, tmp_path)[case]
    before = {folder: _snapshot(folder) for folder in (a, b)}
    code = main(["merge", str(a), str(b), "--out", str(out), *["--overwrite"] * overwrite])
    captured = capsys.readouterr()
    assert code == 2
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"hf-soups merge: error: {out}: {expected}")
    assert "Merging" not in captured.err  # refused before the merge started
    assert {folder: _snapshot(folder) for folder in (a, b)} == before
    assert not (a / "soup").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_sibling_whose_name_extends_an_input_is_not_inside_it(folders, capsys):
    a, b, _ = folders
    out = a.with_name(a.name + "-soup")  # "a-soup" is beside "a", not inside it
    assert main(["-q", "merge", str(a), str(b), "--out", str(out)]) == 0
    assert_matches_reference(load_weights(out), weighted_reference([a, b], [0.5, 0.5]))


def test_the_hub_cache_is_never_an_output(folders, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    a, b, _ = folders
    home = tmp_path / "home"
    cache = home / "hub-cache"
    (cache / "models--acme--x").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for out, relation in [
        (cache, "is"),
        (cache / "models--acme--x" / "soup", "lies inside"),
        (home, "contains"),
    ]:
        assert main(["merge", str(a), str(b), "--out", str(out), "--overwrite"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"hf-soups merge: error: {out}: the output {relation} the Hub cache")
    assert os.listdir(cache) == ["models--acme--x"] and os.listdir(home) == ["hub-cache"]


def test_out_dot_fails_before_the_merge(folders, tmp_path, monkeypatch, capsys):
    a, b, _ = folders
    empty = tmp_path / "work"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for extra in ([], ["--overwrite"]):
        assert main(["merge", str(a), str(b), "--out", ".", *extra]) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        assert line.startswith("hf-soups merge: error: .: the output is the current folder")
        assert "Merging" not in captured.err
    assert os.listdir(empty) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_symlinked_output_is_replaced_without_leftovers(folders, tmp_path):
    a, b, outputs = folders
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours")
    out = outputs / "soup"
    out.symlink_to(elsewhere, target_is_directory=True)
    assert main(["-q", "merge", str(a), str(b), "--out", str(out), "--overwrite"]) == 0
    assert out.is_dir() and not out.is_symlink()
    assert os.listdir(outputs) == ["soup"]  # no .soup.old-* beside it
    assert os.listdir(elsewhere) == ["keep.txt"]  # the link was replaced, not its target
    assert_matches_reference(load_weights(out), weighted_reference([a, b], [0.5, 0.5]))


# -- interruptions, full disks, killed runs ---------------------------------------------------


def _fail_on_second_shard(error: BaseException):
    """A weights writer that fails on its first tensor of the second shard file."""
    files = []

    class WriterThenFail(SafetensorsWriter):
        def write(self, name, tensor):
            if self.path not in files:
                files.append(self.path)
            if len(files) == 2:
                raise error
            super().write(name, tensor)

    return WriterThenFail


@pytest.mark.parametrize(
    "error, code, message",
    [
        (KeyboardInterrupt(), 130, "hf-soups merge: interrupted; nothing half-written is left"),
        (
            OSError(errno.ENOSPC, "No space left on device"),
            2,
            "hf-soups merge: error: [Errno 28] No space left on device",
        ),
        (
            SafetensorError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                '"No space left on device" })'
            ),
            2,
            "hf-soups merge: error: Error while serializing: IoError(Os { code: 28, kind: "
            'StorageFull, message: "No space left on device" })',
        ),
    ],
    ids=["ctrl-c", "ENOSPC", "SafetensorError"],
)
def test_interrupt_and_full_disk_are_one_line_and_leave_nothing(
    folders, monkeypatch, capsys, error, code, message
):
    a, b, outputs = folders
    monkeypatch.setattr("hf_soups.merge.SafetensorsWriter", _fail_on_second_shard(error))
    args = ["merge", str(a), str(b), "--out", str(outputs / "soup"), "--max-shard-size", "10KB"]
    assert main(args) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == message and not any(line.startswith("Traceback") for line in lines)
    assert os.listdir(outputs) == []


def test_a_real_file_size_limit_is_one_line(folders):
    """``ulimit -f``: writes past the limit fail with EFBIG (Python ignores SIGXFSZ)."""
    import resource

    a, b, outputs = folders
    limit = 16 * 1024  # smaller than one merged weights file
    assert (a / "model.safetensors").stat().st_size > limit
    done = subprocess.run(
        [_hf_soups(), "merge", str(a), str(b), "--out", str(outputs / "soup")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("hf-soups merge: error: ") and "Traceback" not in done.stderr
    assert "File too large" in last or "FileTooLarge" in last or "27" in last, last
    assert os.listdir(outputs) == []


KILLED_RUNNER = """
import sys, time
from pathlib import Path
import hf_soups.merge
class WriterThenHang(hf_soups.merge.SafetensorsWriter):
    def __exit__(self, *error):
        super().__exit__(*error)
        Path(sys.argv[1]).write_text("one shard written")
        time.sleep(600)
hf_soups.merge.SafetensorsWriter = WriterThenHang
from hf_soups.cli import main
main(sys.argv[2:])
"""


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run(folders, tmp_path):
    a, b, outputs = folders
    out = outputs / "soup"
    flag = tmp_path / "flag"
    args = ["-q", "merge", str(a), str(b), "--out", str(out), "--max-shard-size", "10KB"]
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUNNER, str(flag), *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (temporary,) = outputs.iterdir()
    assert temporary.name.startswith(f".soup.tmp-{child.pid}-")
    assert any(temporary.glob("*.safetensors"))
    # A run killed while replacing an output leaves the previous one aside; a live run's
    # temporary folder (this process's) must survive.
    replaced = outputs / f".soup.old-{child.pid}-0123abcd"
    shutil.copytree(a, replaced)
    alive = outputs / f".soup.tmp-{os.getpid()}-0123abcd"
    alive.mkdir()

    assert main(args) == 0
    assert sorted(os.listdir(outputs)) == sorted(["soup", alive.name])
    assert_matches_reference(load_weights(out), weighted_reference([a, b], [0.5, 0.5]))
